//! TLS material for the control plane: `flotilla certs init` (a CA, the
//! replicas' certificate and the clients' certificate, made with rcgen), a
//! coordinator's own material made on first start, and each command's TLS
//! flags turned into the process's dialing mode.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use flotilla_proto::tls::{self, Role, Tls, TlsPaths};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// How a client command or a worker reaches the coordinator: with a TLS
/// folder's client certificate, or in plaintext.
#[derive(Debug, Args, Clone, Default)]
pub struct TlsArgs {
    /// The TLS folder (from `flotilla certs init`, or the `tls` folder a
    /// coordinator made in its data directory): ca.pem, client.pem,
    /// client.key [default: ./flotilla-coordinator/tls if it exists].
    #[arg(long, env = "FLOTILLA_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Talk plaintext to a coordinator started with --insecure.
    #[arg(long)]
    pub insecure: bool,
}

/// Where a coordinator started in the current directory without a data
/// directory keeps its log, and so its own TLS folder.
pub const DEFAULT_LOCAL_DIR: &str = "flotilla-coordinator/tls";

/// Files a complete TLS folder holds (the CA key is optional: it only
/// signs, and an operator may keep it elsewhere).
const NEEDED: [&str; 5] = [tls::CA_CERT, tls::SERVER_CERT, tls::SERVER_KEY, tls::CLIENT_CERT, tls::CLIENT_KEY];

/// The TLS material a client or worker presents, from its flags; `None`
/// under `--insecure`.
pub fn client_tls(args: &TlsArgs) -> anyhow::Result<Option<Tls>> {
    if args.insecure {
        tracing::warn!("--insecure: talking to the coordinator in plaintext, without TLS");
        return Ok(None);
    }
    let dir = match &args.tls_dir {
        Some(dir) => dir.clone(),
        None if Path::new(DEFAULT_LOCAL_DIR).join(tls::CA_CERT).exists() => PathBuf::from(DEFAULT_LOCAL_DIR),
        None => anyhow::bail!(
            "no TLS material: give --tls-dir DIR (or FLOTILLA_TLS_DIR) with ca.pem, client.pem and client.key \
             (the folder the coordinator printed when it started, or one made by `flotilla certs init`); \
             --insecure talks plaintext to a coordinator started with --insecure"
        ),
    };
    let tls = Tls::load(&TlsPaths::in_dir(&dir, Role::Client)).map_err(anyhow::Error::msg)?;
    Ok(Some(tls))
}

/// Sets this process's dialing mode from a client's or worker's flags.
pub fn dial_as_client(args: &TlsArgs) -> anyhow::Result<()> {
    let tls = client_tls(args)?;
    tls::set_dialing(tls.as_ref());
    Ok(())
}

/// The flags that give a child process (a local worker) the same TLS
/// material as this folder.
pub fn child_args(dir: Option<&Path>) -> Vec<String> {
    match dir {
        Some(dir) => vec!["--tls-dir".into(), dir.display().to_string()],
        None => vec!["--insecure".into()],
    }
}

/// The certificates of a new TLS folder, file name → PEM text.
pub fn generate(hosts: &[String]) -> anyhow::Result<Vec<(&'static str, String)>> {
    let until = rcgen::date_time_ymd(this_year() + 10, 1, 1);
    let ca_key = KeyPair::generate().context("make the CA key")?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "flotilla control-plane CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca.not_after = until;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = CertifiedIssuer::self_signed(ca, ca_key).context("sign the CA certificate")?;

    let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
    for h in hosts.iter().map(|h| h.trim()).filter(|h| !h.is_empty()) {
        let name_like = h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        anyhow::ensure!(
            name_like || h.parse::<std::net::IpAddr>().is_ok(),
            "--hosts: {h:?} is not a host name or an IP address"
        );
        if !names.iter().any(|n| n == h) {
            names.push(h.to_string());
        }
    }
    let leaf = |names: Vec<String>, cn: &str, usages: Vec<ExtendedKeyUsagePurpose>| -> anyhow::Result<_> {
        let key = KeyPair::generate().context("make a key")?;
        let mut p = CertificateParams::new(names.clone())
            .with_context(|| format!("certificate names {names:?} (give host names or IP addresses)"))?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = usages;
        p.use_authority_key_identifier_extension = true;
        p.not_after = until;
        let cert = p.signed_by(&key, &issuer).with_context(|| format!("sign the {cn} certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    // Replicas serve with it and present it when they dial each other.
    let (server, server_key) = leaf(names, "flotilla coordinator", vec![ServerAuth, ClientAuth])?;
    let (client, client_key) = leaf(Vec::new(), "flotilla client", vec![ClientAuth])?;
    Ok(vec![
        (tls::CA_CERT, issuer.pem()),
        (tls::CA_KEY, ca_key_pem),
        (tls::SERVER_CERT, server),
        (tls::SERVER_KEY, server_key),
        (tls::CLIENT_CERT, client),
        (tls::CLIENT_KEY, client_key),
    ])
}

fn this_year() -> i32 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    1970 + (secs / 31_556_952) as i32
}

/// Writes `files` into `dir` (made if missing). Without `force`, refuses
/// before writing anything if one of them exists. Keys are mode 0600.
pub fn write_files(dir: &Path, files: &[(&'static str, String)], force: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    if !force {
        let present: Vec<&str> = files.iter().map(|(n, _)| *n).filter(|n| dir.join(n).exists()).collect();
        anyhow::ensure!(
            present.is_empty(),
            "{} already holds {}: not overwritten (--force replaces them; every replica, worker and client then \
             needs the new files)",
            dir.display(),
            present.join(", ")
        );
    }
    for (name, text) in files {
        let path = dir.join(name);
        let secret = name.ends_with(".key");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).mode(if secret { 0o600 } else { 0o644 });
        if force {
            options.create(true).truncate(true);
        } else {
            options.create_new(true);
        }
        let mut f = options.open(&path).with_context(|| format!("create {}", path.display()))?;
        if secret {
            // `mode` applies to new files only; a replaced key is tightened too.
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("restrict {}", path.display()))?;
        }
        f.write_all(text.as_bytes()).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// `flotilla certs init DIR`.
pub fn init(dir: &Path, hosts: &[String], force: bool) -> anyhow::Result<()> {
    let files = generate(hosts)?;
    write_files(dir, &files, force)?;
    let fp = tls::fingerprint(files[0].1.as_bytes()).unwrap_or_default();
    println!("wrote a CA, a coordinator certificate and a client certificate to {}", dir.display());
    println!("  CA fingerprint (SHA-256): {fp}");
    println!("  replicas:         flotilla coordinator --tls-dir {}", dir.display());
    println!(
        "  workers, the CLI: --tls-dir {0} or FLOTILLA_TLS_DIR={0} (they need ca.pem, client.pem, client.key)",
        dir.display()
    );
    Ok(())
}

/// A coordinator's TLS folder made on first start: reused if complete,
/// made if absent (returns true then), an error if only partly there.
pub fn ensure(dir: &Path, hosts: &[String]) -> anyhow::Result<bool> {
    let missing: Vec<&str> = NEEDED.iter().copied().filter(|n| !dir.join(n).exists()).collect();
    if missing.is_empty() {
        return Ok(false);
    }
    let all = NEEDED.iter().chain([&tls::CA_KEY]);
    let present: Vec<&str> = all.copied().filter(|n| dir.join(n).exists()).collect();
    anyhow::ensure!(
        present.is_empty(),
        "{} holds part of a TLS folder ({} missing): complete it with `flotilla certs init {} --force` or give \
         --tls-dir",
        dir.display(),
        missing.join(", "),
        dir.display()
    );
    write_files(dir, &generate(hosts)?, false)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_folder_loads_for_both_roles_and_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate(&["10.0.0.1".into(), "coord.example".into()]).unwrap();
        write_files(dir.path(), &files, false).unwrap();
        let server = Tls::load(&TlsPaths::in_dir(dir.path(), Role::Coordinator)).unwrap();
        let client = Tls::load(&TlsPaths::in_dir(dir.path(), Role::Client)).unwrap();
        assert_eq!(server.ca_fingerprint(), client.ca_fingerprint());
        use std::os::unix::fs::PermissionsExt;
        for key in [tls::CA_KEY, tls::SERVER_KEY, tls::CLIENT_KEY] {
            let mode = std::fs::metadata(dir.path().join(key)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let before = std::fs::read(dir.path().join(tls::CA_CERT)).unwrap();
        let e = write_files(dir.path(), &generate(&[]).unwrap(), false).unwrap_err().to_string();
        assert!(e.contains("not overwritten") && e.contains("ca.pem"), "{e}");
        assert_eq!(std::fs::read(dir.path().join(tls::CA_CERT)).unwrap(), before);
        write_files(dir.path(), &generate(&[]).unwrap(), true).unwrap();
        assert_ne!(std::fs::read(dir.path().join(tls::CA_CERT)).unwrap(), before);
    }

    #[test]
    fn a_bad_host_name_is_an_error() {
        let e = generate(&["not a host".into()]).err().unwrap();
        assert!(format!("{e:#}").contains("not a host"), "{e:#}");
    }

    #[test]
    fn ensure_makes_reuses_and_refuses_a_partial_folder() {
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = dir.path().join("tls");
        assert!(ensure(&tls_dir, &[]).unwrap());
        let ca = std::fs::read(tls_dir.join(tls::CA_CERT)).unwrap();
        assert!(!ensure(&tls_dir, &[]).unwrap());
        assert_eq!(std::fs::read(tls_dir.join(tls::CA_CERT)).unwrap(), ca);
        std::fs::remove_file(tls_dir.join(tls::CLIENT_KEY)).unwrap();
        let e = ensure(&tls_dir, &[]).unwrap_err().to_string();
        assert!(e.contains("client.key"), "{e}");
    }
}

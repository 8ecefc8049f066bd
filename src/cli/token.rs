//! `flotilla token create|list|revoke`: API tokens, through the leading
//! coordinator (admin role).

use clap::Subcommand;
use flotilla_proto::auth::Credentials;
use flotilla_proto::leader;
use flotilla_proto::v1 as pb;
use flotilla_proto::v1::token_service_client::TokenServiceClient;

use super::CoordinatorArg;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint a token and print it (only this once: the coordinator keeps its
    /// hash). Roles: admin (everything), submit (submit, cancel and
    /// register its own jobs, read), read, worker (run a worker).
    Create {
        #[arg(long)]
        role: String,
        /// A unique name: it shows as a job's submitter, and revokes it.
        #[arg(long)]
        name: String,
        /// Write the token to this file (mode 0600, must not exist) instead
        /// of printing it.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        #[command(flatten)]
        coordinator: CoordinatorArg,
    },
    /// Every token: name, role, id, when made and by whom, revoked or not.
    List {
        #[command(flatten)]
        coordinator: CoordinatorArg,
    },
    /// Print a new random token without asking a coordinator: for the
    /// admin token file or Secret that coordinators start with.
    Generate,
    /// Revoke a token by name, on every replica at once.
    Revoke {
        name: String,
        #[command(flatten)]
        coordinator: CoordinatorArg,
    },
}

fn when(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}Z", rem / 3600, rem % 3600 / 60)
}

/// Calls `f` on the leader's token service; refusals print and exit 1.
async fn on_leader<T, F, Fut>(list: &str, f: F) -> anyhow::Result<Result<T, tonic::Status>>
where
    F: FnOnce(TokenServiceClient<flotilla_proto::auth::AuthChannel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let addrs = leader::parse_addrs(list);
    let (_, channel) = super::client::find(&addrs, None).await?;
    Ok(f(TokenServiceClient::new(Credentials::current().wrap(channel))).await.map(tonic::Response::into_inner))
}

fn refused(s: &tonic::Status) -> i32 {
    eprintln!("error: {} ({:?})", s.message(), s.code());
    if s.code() == tonic::Code::InvalidArgument {
        super::EXIT_BAD_INPUT
    } else {
        1
    }
}

pub async fn token(cmd: TokenCommand) -> anyhow::Result<i32> {
    use TokenCommand as T;
    if let T::Create { coordinator, .. } | T::List { coordinator } | T::Revoke { coordinator, .. } = &cmd {
        super::certs::dial_as_client(&coordinator.tls)?;
    }
    match cmd {
        TokenCommand::Generate => {
            let (token, _) = flotilla_coordinator::auth::new_token()?;
            println!("{token}");
            Ok(0)
        }
        TokenCommand::Create { role, name, out, coordinator } => {
            if let Some(out) = &out {
                if out.exists() {
                    eprintln!("error: {} exists; the token goes to a new file only", out.display());
                    return Ok(super::EXIT_BAD_INPUT);
                }
            }
            let req = pb::CreateTokenRequest { name, role };
            let reply =
                match on_leader(&coordinator.coordinator, |mut c| async move { c.create_token(req).await }).await? {
                    Ok(r) => r,
                    Err(s) => return Ok(refused(&s)),
                };
            let info = reply.info.unwrap_or_default();
            match out {
                Some(out) => {
                    use std::io::Write;
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&out)?;
                    f.write_all(format!("{}\n", reply.token).as_bytes())?;
                    eprintln!("token {} ({}, id {}) written to {}", info.name, info.role, info.id, out.display());
                }
                None => {
                    eprintln!(
                        "token {} ({}, id {}); it is shown only now: store it (FLOTILLA_TOKEN or a file for --token-file)",
                        info.name, info.role, info.id
                    );
                    println!("{}", reply.token);
                }
            }
            Ok(0)
        }
        TokenCommand::List { coordinator } => {
            let req = pb::ListTokensRequest {};
            let tokens =
                match on_leader(&coordinator.coordinator, |mut c| async move { c.list_tokens(req).await }).await? {
                    Ok(r) => r.tokens,
                    Err(s) => return Ok(refused(&s)),
                };
            println!("{:<24} {:<7} {:<13} {:<18} {:<18} {}", "NAME", "ROLE", "ID", "CREATED", "REVOKED", "BY");
            for t in tokens {
                println!(
                    "{:<24} {:<7} {:<13} {:<18} {:<18} {}",
                    t.name,
                    t.role,
                    t.id,
                    when(t.created_at_ms),
                    when(t.revoked_at_ms),
                    t.created_by
                );
            }
            Ok(0)
        }
        TokenCommand::Revoke { name, coordinator } => {
            let req = pb::RevokeTokenRequest { name };
            match on_leader(&coordinator.coordinator, |mut c| async move { c.revoke_token(req).await }).await? {
                Ok(t) => {
                    println!("revoked {} ({}, id {})", t.name, t.role, t.id);
                    Ok(0)
                }
                Err(s) => Ok(refused(&s)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::when;

    #[test]
    fn times_print_as_utc_dates() {
        assert_eq!(when(0), "-");
        assert_eq!(when(1_000), "1970-01-01 00:00Z");
        // 2026-12-02 14:45:00 UTC
        assert_eq!(when(1_796_222_700_000), "2026-12-02 14:45Z");
        // 2024-02-29 23:59 UTC (a leap day)
        assert_eq!(when(1_709_251_140_000), "2024-02-29 23:59Z");
    }
}

//! `flotilla status`: a table of jobs, one job in detail (with a per-rank
//! table of pipeline stage, replica and the memory each rank holds), or
//! either as JSON.

use flotilla_proto::v1 as pb;
use serde_json::Value;

use super::client::{phase_name, registration_line};

pub fn print_table(jobs: &[pb::JobStatus]) {
    println!(
        "{:<24} {:<10} {:>5} {:>5} {:>5} {:>4} {:>13} {:>10}",
        "JOB", "PHASE", "QUEUE", "PRIO", "GEN", "WORLD", "STEP", "LOSS"
    );
    for j in jobs {
        println!(
            "{:<24} {:<10} {:>5} {:>5} {:>5} {:>4} {:>13} {:>10.4}",
            j.job_id,
            phase_name(j.phase),
            if j.queue_position == 0 { "-".to_string() } else { format!("#{}", j.queue_position) },
            j.priority,
            j.generation,
            j.world_size,
            format!("{}/{}", j.step, j.total_steps),
            j.loss
        );
    }
}

/// A queued job's place, as `position 2 in the queue, priority 5`; `None`
/// for a job that is not queued.
pub fn queue_text(j: &pb::JobStatus) -> Option<String> {
    (j.queue_position > 0).then(|| format!("position {} in the queue, priority {}", j.queue_position, j.priority))
}

pub fn print_detail(j: &pb::JobStatus) {
    println!("job:          {}", j.job_id);
    println!(
        "phase:        {}{}",
        phase_name(j.phase),
        if j.message.is_empty() { String::new() } else { format!(" ({})", j.message) }
    );
    println!("step:         {}/{}  loss {:.4}  {:.0} samples/s", j.step, j.total_steps, j.loss, j.samples_per_sec);
    if let Some(q) = queue_text(j) {
        println!("queue:        {q}");
    } else if j.priority != 0 {
        println!("priority:     {}", j.priority);
    }
    if let Some(e) = eval_text(j) {
        println!("eval:        {e}");
    }
    println!(
        "workers:      {} (min {}, max {})  generation {}  restarts {}",
        j.world_size, j.min_workers, j.max_workers, j.generation, j.restarts
    );
    if !j.ranks.is_empty() {
        for line in rank_table(&j.ranks).lines() {
            println!("  {line}");
        }
    }
    println!("output:       {}", j.output_dir);
    if !j.submitted_by.is_empty() {
        println!("submitted by: {}", j.submitted_by);
    }
    if let Some(c) = &j.latest_checkpoint {
        println!(
            "checkpoint:   step {} at {} (training blocked {:.1} ms of {:.1} ms)",
            c.step, c.location, c.blocked_ms, c.total_ms
        );
    }
    if !j.final_model.is_empty() {
        println!("final model:  {}", j.final_model);
    }
    if let Some(line) = registration_line(j) {
        println!("registry:     {line}");
    }
    if let Some(run) = j.registration.as_ref().map(|r| &r.tracking_run).filter(|r| !r.is_empty()) {
        println!("tracking run: {run}");
    }
    if !j.generations.is_empty() {
        println!("generations:");
        for g in &j.generations {
            println!(
                "  {:<4} world {:<3} from step {:<6} {}",
                g.generation, g.world_size, g.resumed_from_step, g.reason
            );
        }
    }
}

/// One line per rank: its worker, pipeline stage and replica, the bytes it
/// reported holding ("-" until it reports), the device it computes on
/// (what its worker has until it reports) with, on a GPU, the device
/// memory in use and its peak, its data address and where its worker
/// serves metrics ("-" if it does not).
pub fn rank_table(ranks: &[pb::RankInfo]) -> String {
    let header = [
        "RANK",
        "WORKER",
        "STAGE",
        "REPLICA",
        "PARAMS",
        "GRADS",
        "OPTIMIZER",
        "ACTIVATIONS",
        "DEVICE",
        "GPU-MEM",
        "ADDRESS",
        "METRICS",
    ];
    let rows: Vec<[String; 12]> = ranks
        .iter()
        .map(|r| {
            let bytes =
                |f: fn(&pb::MemoryUsage) -> u64| r.memory.as_ref().map_or_else(|| "-".into(), |m| human_bytes(f(m)));
            [
                r.rank.to_string(),
                r.worker_id.clone(),
                r.stage.to_string(),
                r.replica.to_string(),
                bytes(|m| m.params_bytes),
                bytes(|m| m.grads_bytes),
                bytes(|m| m.optimizer_bytes),
                bytes(|m| m.activation_bytes),
                device(r),
                match r.memory.as_ref().filter(|m| m.device.starts_with("cuda")) {
                    Some(m) => format!("{}/{}", human_bytes(m.device_used_bytes), human_bytes(m.device_peak_bytes)),
                    None => "-".into(),
                },
                r.data_addr.clone(),
                if r.metrics_addr.is_empty() { "-".into() } else { r.metrics_addr.clone() },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[&str]| -> String {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            match i {
                // Identifiers and the address left, numbers right.
                1 | 8 | 10 | 11 => out.push_str(&format!("{cell:<w$}")),
                _ => out.push_str(&format!("{cell:>w$}")),
            }
            if i + 1 < cells.len() {
                out.push_str("  ");
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(&header);
    for row in &rows {
        out.push_str(&line(&row.each_ref().map(String::as_str)));
    }
    out
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `3.0 MiB`, `2.0 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// What a rank computes on: as it reported, else its worker's device (the
/// rank uses it unless the job says `train.device: cpu`), else "-".
fn device(r: &pb::RankInfo) -> String {
    match r.memory.as_ref().map(|m| m.device.as_str()).filter(|d| !d.is_empty()) {
        Some(d) => d.to_string(),
        None if !r.device.is_empty() => r.device.split(' ').next().unwrap_or("-").to_string(),
        None => "-".into(),
    }
}

/// The latest evaluation, as `loss 1.2345 (accuracy 0.9375) at step 50`.
pub fn eval_text(j: &pb::JobStatus) -> Option<String> {
    let loss = j.eval_loss?;
    let accuracy = j.eval_accuracy.map(|a| format!(" (accuracy {a:.4})")).unwrap_or_default();
    Some(format!(" loss {loss:.4}{accuracy} at step {}", j.eval_step.unwrap_or_default()))
}

/// A job's status as JSON (`flotilla status --json`): the HTTP API's JSON
/// of a job (`flotilla_coordinator::http::json::job`).
pub fn status_json(j: &pb::JobStatus) -> Value {
    flotilla_coordinator::http::json::job(j)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(rank: u32, stage: u32, replica: u32, memory: Option<pb::MemoryUsage>) -> pb::RankInfo {
        pb::RankInfo {
            rank,
            worker_id: format!("w{}", rank + 1),
            data_addr: format!("127.0.0.1:{}", 5000 + rank),
            stage,
            replica,
            memory,
            metrics_addr: if rank == 0 { "127.0.0.1:9464".into() } else { String::new() },
            device: "cuda:1 (NVIDIA H200)".into(),
            step_times: None,
        }
    }

    fn usage() -> pb::MemoryUsage {
        pb::MemoryUsage {
            params_bytes: 3 << 20,
            grads_bytes: 1536,
            optimizer_bytes: 512,
            activation_bytes: 5 << 30,
            device: "cuda:1".into(),
            device_used_bytes: 6 << 30,
            device_peak_bytes: 7 << 30,
        }
    }

    #[test]
    fn bytes_read_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16384.0 PiB");
    }

    #[test]
    fn the_rank_table_shows_stage_replica_and_memory() {
        let table = rank_table(&[rank(0, 0, 0, Some(usage())), rank(1, 1, 0, None)]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        let words = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert_eq!(
            words(lines[0]),
            [
                "RANK",
                "WORKER",
                "STAGE",
                "REPLICA",
                "PARAMS",
                "GRADS",
                "OPTIMIZER",
                "ACTIVATIONS",
                "DEVICE",
                "GPU-MEM",
                "ADDRESS",
                "METRICS"
            ]
        );
        assert_eq!(
            lines[1],
            "   0  w1          0        0  3.0 MiB  1.5 KiB      512 B      5.0 GiB  cuda:1  6.0 GiB/7.0 GiB  \
             127.0.0.1:5000  127.0.0.1:9464"
        );
        // Before its first report: its worker's device, without memory.
        assert_eq!(words(lines[2]), ["1", "w2", "1", "0", "-", "-", "-", "-", "cuda:1", "-", "127.0.0.1:5001", "-"]);
    }

    #[test]
    fn json_status_carries_each_rank_s_stage_replica_and_memory() {
        let status = pb::JobStatus {
            job_id: "pipe-1".into(),
            phase: pb::JobPhase::Running as i32,
            ranks: vec![rank(0, 0, 0, Some(usage())), rank(3, 1, 1, None)],
            ..Default::default()
        };
        let v = status_json(&status);
        assert_eq!(v["phase"], "running");
        assert_eq!(v["ranks"][0]["memory"]["params_bytes"], 3 << 20);
        assert_eq!(v["ranks"][0]["memory"]["activation_bytes"], 5u64 << 30);
        assert_eq!((v["ranks"][1]["stage"].as_u64(), v["ranks"][1]["replica"].as_u64()), (Some(1), Some(1)));
        assert!(v["ranks"][1]["memory"].is_null());
        assert!(v["latest_checkpoint"].is_null() && v["registration"].is_null());
        assert!(v["queue_position"].is_null(), "a running job has no place in the queue");
    }

    #[test]
    fn a_queued_job_shows_its_place_and_priority() {
        let queued = pb::JobStatus {
            job_id: "big-2".into(),
            phase: pb::JobPhase::Pending as i32,
            priority: 5,
            queue_position: 2,
            ..Default::default()
        };
        assert_eq!(queue_text(&queued).as_deref(), Some("position 2 in the queue, priority 5"));
        let v = status_json(&queued);
        assert_eq!((v["queue_position"].as_u64(), v["priority"].as_i64()), (Some(2), Some(5)));
        assert_eq!(queue_text(&pb::JobStatus { priority: 5, ..Default::default() }), None);
    }
}

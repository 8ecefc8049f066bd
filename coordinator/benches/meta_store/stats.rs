//! Latency samples, closed-loop write measurement and table printing for the
//! meta-store bench.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One write of a backend; the argument is a sequence number unique in the
/// run (keys and worker addresses are derived from it). Panics on failure:
/// a failed write is a bug for this bench.
pub type Op = Arc<dyn Fn(u64) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// How long a measurement goes on: a number of writes per client, or a time.
#[derive(Clone, Copy, Debug)]
pub enum Budget {
    Ops(usize),
    Time(Duration),
}

/// Latencies of one measurement, sorted, and the wall time it took.
pub struct Sample {
    pub lat: Vec<Duration>,
    pub wall: Duration,
}

impl Sample {
    pub fn from(mut lat: Vec<Duration>, wall: Duration) -> Sample {
        lat.sort_unstable();
        Sample { lat, wall }
    }

    pub fn count(&self) -> usize {
        self.lat.len()
    }

    pub fn per_s(&self) -> f64 {
        self.lat.len() as f64 / self.wall.as_secs_f64()
    }

    /// The `q` quantile (0..=1), nearest rank.
    pub fn q(&self, q: f64) -> Duration {
        if self.lat.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((q * self.lat.len() as f64).ceil() as usize).clamp(1, self.lat.len());
        self.lat[rank - 1]
    }

    pub fn max(&self) -> Duration {
        self.lat.last().copied().unwrap_or_default()
    }
}

/// Runs `op` from `clients` concurrent closed-loop clients (each waits for
/// its write to be acknowledged before the next) until `budget` is spent.
/// The sequence numbers continue from `seq`.
pub async fn measure(op: &Op, clients: usize, budget: Budget, seq: &Arc<AtomicU64>) -> Sample {
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (op, seq) = (op.clone(), seq.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let done = match budget {
                        Budget::Ops(n) => lat.len() >= n,
                        Budget::Time(d) => start.elapsed() >= d,
                    };
                    if done {
                        return lat;
                    }
                    let i = seq.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    op(i).await;
                    lat.push(t.elapsed());
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("bench client task"));
    }
    Sample::from(all, start.elapsed())
}

/// `d` in milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Prints a markdown table.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    println!("| {} |", header.join(" | "));
    println!("|{}", " --- |".repeat(header.len()));
    for row in rows {
        println!("| {} |", row.join(" | "));
    }
    println!();
}

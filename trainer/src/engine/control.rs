//! The step's control exchange: after its passes every rank tells every
//! other a few typed values (its loss sum, the squared norm of the
//! gradients it owns, whether its checkpoint shard is up, and, from rank 0,
//! whether the coordinator asked for a checkpoint), in one small collective
//! over the world. Every rank combines the same reports in rank order, so
//! every rank reaches the same verdict.

use super::collective::Collectives;
use crate::types::TrainError;

/// What one rank reports at the end of a step's passes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct StepReport {
    /// Sum of the per-sample losses this rank computed (last stages only).
    pub loss_sum: f64,
    /// Squared norm of the reduced gradients this rank owns.
    pub grad_squares: f64,
    /// The coordinator asked for a checkpoint (rank 0's word counts).
    pub checkpoint_requested: bool,
    /// This rank's shard of the pending checkpoint is uploaded (or failed).
    pub shard_done: bool,
}

/// What every rank concludes from all reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct StepVerdict {
    pub loss_sum: f64,
    pub grad_norm: f64,
    pub checkpoint_requested: bool,
    /// Every rank's shard of the pending checkpoint is up.
    pub all_shards_done: bool,
}

const LEN: usize = 18;

impl StepReport {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LEN);
        out.extend_from_slice(&self.loss_sum.to_le_bytes());
        out.extend_from_slice(&self.grad_squares.to_le_bytes());
        out.push(u8::from(self.checkpoint_requested));
        out.push(u8::from(self.shard_done));
        out
    }

    fn decode(b: &[u8]) -> Option<StepReport> {
        if b.len() != LEN || b[16] > 1 || b[17] > 1 {
            return None;
        }
        Some(StepReport {
            loss_sum: f64::from_le_bytes(b[0..8].try_into().ok()?),
            grad_squares: f64::from_le_bytes(b[8..16].try_into().ok()?),
            checkpoint_requested: b[16] == 1,
            shard_done: b[17] == 1,
        })
    }
}

/// The verdict of every rank's reports (index = rank).
pub(crate) fn combine(reports: &[StepReport]) -> StepVerdict {
    StepVerdict {
        loss_sum: reports.iter().map(|r| r.loss_sum).sum(),
        grad_norm: reports.iter().map(|r| r.grad_squares).sum::<f64>().sqrt(),
        checkpoint_requested: reports.first().is_some_and(|r| r.checkpoint_requested),
        all_shards_done: reports.iter().all(|r| r.shard_done),
    }
}

/// Sends `mine` to every rank and combines everyone's.
pub(crate) fn exchange(world: &mut Collectives, mine: StepReport) -> Result<StepVerdict, TrainError> {
    let all = world.all_gather_bytes(mine.encode())?;
    let reports = all
        .iter()
        .enumerate()
        .map(|(rank, b)| {
            StepReport::decode(b).ok_or_else(|| {
                TrainError::Fatal(format!("rank {rank} sent a malformed step report ({} bytes)", b.len()))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(combine(&reports))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_comm::SingleProcess;

    fn report(loss: f64, sq: f64, ck: bool, done: bool) -> StepReport {
        StepReport { loss_sum: loss, grad_squares: sq, checkpoint_requested: ck, shard_done: done }
    }

    #[test]
    fn reports_round_trip_and_garbage_is_refused() {
        let r = report(1.5, 2.25, true, false);
        assert_eq!(StepReport::decode(&r.encode()), Some(r));
        assert_eq!(StepReport::decode(&[0; 3]), None);
        let mut bad = r.encode();
        bad[17] = 7;
        assert_eq!(StepReport::decode(&bad), None);
    }

    #[test]
    fn the_verdict_sums_losses_and_norms_and_needs_every_shard() {
        let v = combine(&[report(1.0, 9.0, true, true), report(2.0, 16.0, false, false)]);
        assert_eq!((v.loss_sum, v.grad_norm), (3.0, 5.0));
        assert!(v.checkpoint_requested, "rank 0 asked");
        assert!(!v.all_shards_done, "rank 1's shard is not up");
        let v = combine(&[report(0.0, 0.0, false, true), report(0.0, 0.0, true, true)]);
        assert!(!v.checkpoint_requested, "only rank 0 speaks for the coordinator");
        assert!(v.all_shards_done);
    }

    #[test]
    fn one_process_exchanges_with_itself() {
        let mut world = Collectives::spawn(Box::new(SingleProcess::new(1)), "test");
        let v = exchange(&mut world, report(4.0, 4.0, false, true)).unwrap();
        assert_eq!((v.loss_sum, v.grad_norm, v.all_shards_done), (4.0, 2.0, true));
    }
}

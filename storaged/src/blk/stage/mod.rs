//! The stages a request passes through between parsing and the backing storage, in the order
//! it meets them:
//!
//! - [`limit`]: it draws its cost from the volume's IOPS and bandwidth buckets, or waits;
//! - [`transform`]: an encrypted volume's data is encrypted into the bounce buffer on the way
//!   out and decrypted on the way back;
//! - [`replicate`]: a primary volume's completed writes, discards, write-zeroes and flushes
//!   are appended to its replication log before the guest is answered.
//!
//! The queue holds them as one [`Stages`] value, called directly (no dynamic dispatch on the
//! data path).

pub mod limit;
pub mod replicate;
pub mod transform;

use crate::blk::VolumeIo;
use crate::qos::QosSlot;

/// The stages of one queue.
pub struct Stages {
    pub limit: limit::LimitStage,
}

impl Stages {
    pub fn new(qos: &QosSlot) -> Self {
        Stages {
            limit: limit::LimitStage::new(qos),
        }
    }

    /// The transform of `volume` (it keeps no state of its own).
    pub fn transform<'a>(&self, volume: &'a VolumeIo) -> transform::Transform<'a> {
        transform::Transform::of(volume)
    }

    /// The replicate stage of `volume` (its state is the volume's log).
    pub fn replicate(&self, volume: &VolumeIo) -> replicate::Replicate {
        replicate::Replicate::of(volume)
    }
}

//! Block devices for tests of device-backed volumes, made of real kernel parts (loop devices,
//! file systems, `fsfreeze`): no fault-injection hook in storaged. They need root and a few
//! tools; where one cannot be set up its constructor returns `None` and the test skips
//! ([`crate::skip`]). Each is taken apart on drop.

mod freezable_device;
mod loop_device;
mod writeback_fault;

pub use freezable_device::FreezableDevice;
pub use loop_device::LoopDevice;
pub use writeback_fault::WritebackFault;

//! Legacy devices on the port I/O bus: the 16550 UART at 0x3f8 (ttyS0, IRQ 4), the i8042
//! controller's reset line (a write of 0xfe to port 0x64 ends the VM, as a reboot), the
//! ACPI sleep control register of the hardware-reduced FADT (S5 ends the VM, as a power-off),
//! and the event register of the ACPI Generic Event Device through which the power button
//! is pressed.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::console::Console;

/// First port of ttyS0 and its interrupt line.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
/// ACPI sleep control and status registers (see [`crate::acpi`]).
pub const SLEEP_CONTROL_PORT: u16 = 0x3c0;
pub const SLEEP_STATUS_PORT: u16 = 0x3c1;
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_S5: u8 = 5;

/// The ACPI Generic Event Device's event register and interrupt (see [`crate::acpi`]): the
/// register holds the events raised since the guest last read it, and a read clears them.
/// The GED's `_EVT` method reads it when the interrupt fires. The interrupt is the IOAPIC's
/// last pin, above the disks'.
pub const GED_PORT: u16 = 0x3c4;
pub const GED_IRQ: u32 = 23;
/// The event register's bit for the power button.
pub const GED_POWER_BUTTON: u8 = 1;

/// i8042 command port.
pub const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// An interrupt line raised by writing an eventfd registered as a KVM irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The power button: a press raises [`GED_POWER_BUTTON`] in the GED's event register and
/// the GED's interrupt; the guest's ACPI then notifies its power button device (`PNP0C0C`),
/// and its OS decides what to do (Linux reports a KEY_POWER, and its init or logind powers
/// off).
pub struct PowerButton {
    pending: AtomicU8,
    irq: IrqLine,
}

impl PowerButton {
    /// A button whose presses raise the GED interrupt `irq` (an irqfd's eventfd).
    pub fn new(irq: EventFd) -> Self {
        PowerButton {
            pending: AtomicU8::new(0),
            irq: IrqLine(irq),
        }
    }

    pub fn press(&self) -> std::io::Result<()> {
        self.pending.fetch_or(GED_POWER_BUTTON, Ordering::SeqCst);
        self.irq.trigger()
    }

    /// The events raised since the last read, cleared (the event register's read).
    fn take(&self) -> u8 {
        self.pending.swap(0, Ordering::SeqCst)
    }
}

/// What a port access asks of the VMM.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    None,
    /// The guest reset the machine through the i8042.
    Reset,
    /// The guest entered S5 (power-off) through the ACPI sleep control register.
    PowerOff,
}

/// The port I/O devices of a VM. The serial port's output is a [`Console`]: it never waits
/// on the host.
pub struct PortBus {
    pub serial: Serial<IrqLine, NoEvents, Console>,
    button: Arc<PowerButton>,
}

impl PortBus {
    pub fn new(irq: EventFd, console: Console, button: Arc<PowerButton>) -> Self {
        PortBus {
            serial: Serial::new(IrqLine(irq), console),
            button,
        }
    }

    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                data[0] = self.serial.read((p - SERIAL_PORT) as u8);
            }
            // i8042 status: nothing to read, ready for commands.
            I8042_COMMAND if data.len() == 1 => data[0] = 0,
            GED_PORT if data.len() == 1 => data[0] = self.button.take(),
            _ => {}
        }
    }

    pub fn write(&mut self, port: u16, data: &[u8]) -> Action {
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                if let Err(e) = self.serial.write((p - SERIAL_PORT) as u8, data[0]) {
                    tracing::debug!("serial write failed: {e:?}");
                }
                Action::None
            }
            I8042_COMMAND if data == [I8042_RESET] => Action::Reset,
            SLEEP_CONTROL_PORT
                if data.len() == 1 && data[0] & SLP_EN != 0 && (data[0] >> 2) & 7 == SLP_TYP_S5 =>
            {
                Action::PowerOff
            }
            _ => Action::None,
        }
    }
}

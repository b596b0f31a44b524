//! ACPI tables for a hardware-reduced platform: RSDP, XSDT, FADT, MADT (a local APIC per
//! vCPU, one IOAPIC) and a DSDT describing the serial port, the virtio-mmio disks, and the
//! power button behind a Generic Event Device. Linux finds the RSDP in the BIOS
//! area (0xe0000) and through the zero page.

use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use acpi_tables::gas::{AccessSize, AddressSpace, GAS};

use crate::devices::{
    GED_IRQ, GED_PORT, GED_POWER_BUTTON, SERIAL_IRQ, SERIAL_PORT, SLEEP_CONTROL_PORT,
    SLEEP_STATUS_PORT,
};

/// Where the RSDP goes (the start of the BIOS read-only area Linux scans).
pub const RSDP_ADDR: u64 = 0xe_0000;
/// The other tables follow it.
const TABLES_START: u64 = 0xe_0100;
/// Local APIC and IOAPIC addresses.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;

/// IA-PC boot architecture flags of the FADT (ACPI 6.5, table 5.11).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

const OEM_ID: [u8; 6] = *b"SOVIAS";
const OEM_TABLE_ID: [u8; 8] = *b"VMM     ";

/// Writes the tables for `vcpus` vCPUs and the virtio-mmio devices at `mmio` (base, GSI);
/// returns the RSDP's address.
pub fn write(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    mmio: &[(u64, u32)],
) -> Result<u64, vm_memory::GuestMemoryError> {
    let mut at = TABLES_START;
    let mut put = |bytes: &[u8]| -> Result<u64, vm_memory::GuestMemoryError> {
        let addr = at;
        mem.write_slice(bytes, GuestAddress(addr))?;
        at = (at + bytes.len() as u64 + 7) & !7;
        Ok(addr)
    };

    let dsdt = put(dsdt(mmio).as_slice())?;

    let fadt = put(&bytes_of(&fadt(dsdt)))?;

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        1,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    let madt = put(&bytes_of(&madt))?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = put(&bytes_of(&xsdt))?;

    let rsdp = Rsdp::new(OEM_ID, xsdt);
    mem.write_slice(&bytes_of(&rsdp), GuestAddress(RSDP_ADDR))?;
    Ok(RSDP_ADDR)
}

/// The FADT of a hardware-reduced, headless platform with the DSDT at `dsdt`.
fn fadt(dsdt: u64) -> FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::Headless);
    // IA-PC boot architecture flags: no VGA, no CMOS RTC. Without the second, Linux probes
    // rtc_cmos on ports 0x70/0x71, which read 0xff here: the update-in-progress bit never
    // clears and it polls for a second (thousands of port exits, seconds where exits are
    // slow) before it gives up.
    fadt.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).into();
    // Hardware-reduced sleep: the guest powers off by writing SLP_TYP (the _S5_ value, 5)
    // and SLP_EN to the sleep control register.
    fadt.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(SLEEP_CONTROL_PORT),
    );
    fadt.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(SLEEP_STATUS_PORT),
    );
    fadt.finalize()
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT: the 16550 at 0x3f8, IRQ 4; each virtio-mmio device (`LNRO0005`, which
/// Linux's virtio_mmio driver matches); the power button (`PNP0C0C`) and the Generic Event
/// Device (`ACPI0013`) that signals it: hardware-reduced ACPI has no fixed power button
/// event, so the GED's interrupt runs its `_EVT`, which reads the event register
/// ([`GED_PORT`]) and, for the power button's bit, notifies the button (0x80: pressed).
fn dsdt(mmio: &[(u64, u32)]) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, 1);
    let hid = aml::EISAName::new("PNP0501");
    let io = aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let name_hid = aml::Name::new("_HID".into(), &hid);
    let name_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let name_crs = aml::Name::new("_CRS".into(), &crs);
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&name_hid, &name_uid, &name_crs]);
    dsdt.append_slice(&bytes_of(&com1));
    // The power button, and the GED that notifies it.
    let pwrb_hid = aml::EISAName::new("PNP0C0C");
    let pwrb_name_hid = aml::Name::new("_HID".into(), &pwrb_hid);
    let pwrb_name_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let pwrb = aml::Device::new("_SB_.PWRB".into(), vec![&pwrb_name_hid, &pwrb_name_uid]);
    dsdt.append_slice(&bytes_of(&pwrb));
    let ged_hid = aml::AmlStr::from("ACPI0013");
    let ged_irq = aml::Interrupt::new(true, true, false, false, GED_IRQ);
    let ged_crs = aml::ResourceTemplate::new(vec![&ged_irq]);
    let ged_name_hid = aml::Name::new("_HID".into(), &ged_hid);
    let ged_name_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let ged_name_crs = aml::Name::new("_CRS".into(), &ged_crs);
    let port = aml::Usize::from(usize::from(GED_PORT));
    let one_byte = aml::Usize::from(1usize);
    let region = aml::OpRegion::new(
        "GDST".into(),
        aml::OpRegionSpace::SystemIO,
        &port,
        &one_byte,
    );
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let (local0, local1) = (aml::Local(0), aml::Local(1));
    let gdat = aml::Path::new("GDAT");
    let button_bit = aml::Usize::from(usize::from(GED_POWER_BUTTON));
    let read = aml::Store::new(&local0, &gdat);
    let masked = aml::And::new(&local1, &local0, &button_bit);
    let pressed = aml::Usize::from(0x80usize);
    let button_path = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&button_path, &pressed);
    let is_button = aml::Equal::new(&local1, &button_bit);
    let if_button = aml::If::new(&is_button, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read, &masked, &if_button]);
    let ged = aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &ged_name_hid,
            &ged_name_uid,
            &ged_name_crs,
            &region,
            &field,
            &evt,
        ],
    );
    dsdt.append_slice(&bytes_of(&ged));
    // S5 (soft off): SLP_TYP 5 in the sleep control register.
    let s5_typ = aml::Usize::from(5usize);
    let s5 = aml::Package::new(vec![&s5_typ, &s5_typ]);
    dsdt.append_slice(&bytes_of(&aml::Name::new("_S5_".into(), &s5)));
    for (i, (base, irq)) in mmio.iter().enumerate() {
        let path = format!("_SB_.V{i:03X}");
        let hid = aml::AmlStr::from("LNRO0005");
        let uid = aml::Usize::from(i);
        let mem32 =
            aml::Memory32Fixed::new(true, *base as u32, crate::virtio_mmio::MMIO_SIZE as u32);
        let irq = aml::Interrupt::new(true, true, false, false, *irq);
        let crs = aml::ResourceTemplate::new(vec![&mem32, &irq]);
        let name_hid = aml::Name::new("_HID".into(), &hid);
        let name_uid = aml::Name::new("_UID".into(), &uid);
        let name_crs = aml::Name::new("_CRS".into(), &crs);
        let dev = aml::Device::new(path.as_str().into(), vec![&name_hid, &name_uid, &name_crs]);
        dsdt.append_slice(&bytes_of(&dev));
    }
    dsdt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fadt_says_there_is_no_vga_and_no_cmos_rtc() {
        let bytes = bytes_of(&fadt(0x1000));
        assert_eq!(&bytes[0..4], b"FACP");
        // IAPC_BOOT_ARCH is the 16-bit field at offset 109.
        let flags = u16::from_le_bytes([bytes[109], bytes[110]]);
        assert_eq!(flags, IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT);
    }
}

use super::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Regs {
    pc: u64,
    x: Vec<u64>,
    name: String,
}

fn sample() -> (StateWriter, Regs) {
    let regs = Regs {
        pc: 0x8020_0000,
        x: (0..32).collect(),
        name: "hart".into(),
    };
    let mut w = StateWriter::new("riscv64", "rv64imafdc", 256 << 20);
    w.add("config", &"vcpus = 1".to_string()).unwrap();
    w.add("hart.0", &regs).unwrap();
    w.add("plic", &vec![1u32, 2, 3]).unwrap();
    (w, regs)
}

fn read(bytes: &[u8]) -> Result<StateFile, FormatError> {
    StateFile::decode(Path::new("/snap/state"), bytes)
}

/// Offset of section `name`'s payload in an encoded file.
fn payload_at(bytes: &[u8], name: &str) -> usize {
    let needle = [&[name.len() as u8][..], name.as_bytes()].concat();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    at + needle.len() + 8
}

#[test]
fn sections_round_trip() {
    let (w, regs) = sample();
    let bytes = w.encode().unwrap();
    let f = read(&bytes).unwrap();
    assert_eq!(f.header.arch, "riscv64");
    assert_eq!(f.header.cpu, "rv64imafdc");
    assert_eq!(f.header.memory_bytes, 256 << 20);
    assert_eq!(f.header.sections, 3);
    assert_eq!(f.writer, env!("CARGO_PKG_VERSION"));
    assert_eq!(f.section::<Regs>("hart.0").unwrap(), regs);
    assert_eq!(f.section::<String>("config").unwrap(), "vcpus = 1");
    assert_eq!(f.section::<Vec<u32>>("plic").unwrap(), vec![1, 2, 3]);
    let err = f.section::<Regs>("hart.1").unwrap_err().to_string();
    assert!(err.contains("no section \"hart.1\""), "{err}");
    // Compact: the 32 small registers take about a byte each.
    assert!(bytes.len() < 200, "{} bytes", bytes.len());
}

#[test]
fn another_format_version_is_refused_with_what_to_do() {
    let (w, _) = sample();
    let mut bytes = w.encode().unwrap();
    bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
    let err = read(&bytes).err().unwrap().to_string();
    assert!(err.contains("format version 3"), "{err}");
    assert!(err.contains("reads format versions 1 to 2"), "{err}");
    assert!(
        err.contains("restore it with the vme-vmm that wrote it"),
        "{err}"
    );
    let err = read(b"#!/bin/sh\nnot a snapshot")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a vme snapshot"), "{err}");
}

#[test]
fn another_architecture_or_cpu_is_refused() {
    let (w, _) = sample();
    let f = read(&w.encode().unwrap()).unwrap();
    let err = super::super::check_machine(&f, "x86_64", "baseline").unwrap_err();
    assert!(
        err.contains("is of an riscv64 VM") && err.contains("x86_64"),
        "{err}"
    );
    let err = super::super::check_machine(&f, "riscv64", "rv64gc_zba").unwrap_err();
    assert!(err.contains("implementing rv64imafdc"), "{err}");
    super::super::check_machine(&f, "riscv64", "rv64imafdc").unwrap();
}

#[test]
fn a_corrupted_section_is_refused_by_name() {
    let (w, _) = sample();
    let good = w.encode().unwrap();
    let mut bytes = good.clone();
    bytes[payload_at(&good, "hart.0") + 3] ^= 0x10;
    let err = read(&bytes).err().unwrap().to_string();
    assert!(err.contains("section hart.0 fails its CRC-32C"), "{err}");
    // A renamed section is caught too (the name is under the checksum).
    let mut bytes = good.clone();
    let at = payload_at(&good, "plic") - 8 - 1;
    bytes[at] = b'q';
    let err = read(&bytes).err().unwrap().to_string();
    assert!(err.contains("section pliq fails"), "{err}");
    // The header.
    let mut bytes = good.clone();
    let header_at = 8 + 4 + 1 + env!("CARGO_PKG_VERSION").len() + 8;
    bytes[header_at] ^= 1;
    let err = read(&bytes).err().unwrap().to_string();
    assert!(err.contains("the header fails"), "{err}");
}

#[test]
fn a_truncated_file_is_refused_naming_where() {
    let (w, _) = sample();
    let good = w.encode().unwrap();
    let cut = payload_at(&good, "plic") + 1;
    let err = read(&good[..cut]).err().unwrap().to_string();
    assert!(err.contains("truncated in section plic"), "{err}");
    let cut = payload_at(&good, "plic") - 8 - 5;
    let err = read(&good[..cut]).err().unwrap().to_string();
    assert!(err.contains("truncated in section 3 of 3"), "{err}");
    let err = read(&good[..10]).err().unwrap().to_string();
    assert!(err.contains("truncated in the format version"), "{err}");
    let mut longer = good.clone();
    longer.push(0);
    let err = read(&longer).err().unwrap().to_string();
    assert!(err.contains("1 bytes follow the last section"), "{err}");
}

#[test]
fn a_section_that_does_not_decode_as_its_type_is_refused() {
    let (w, _) = sample();
    let f = read(&w.encode().unwrap()).unwrap();
    let err = f.section::<Regs>("plic").unwrap_err().to_string();
    assert!(err.contains("section plic"), "{err}");
    let err = f.section::<u8>("config").unwrap_err().to_string();
    assert!(
        err.contains("section config") && err.contains("follow its data"),
        "{err}"
    );
}

#[test]
fn diffs_are_written_as_version_2_and_sections_copy_across() {
    let (mut w, regs) = sample();
    assert_eq!(
        read(&w.encode().unwrap()).unwrap().version,
        1,
        "full: version 1"
    );
    w.diff_format();
    let f = read(&w.encode().unwrap()).unwrap();
    assert_eq!(f.version, 2);
    let mut copy = StateWriter::new("riscv64", "rv64imafdc", 256 << 20);
    for (name, data) in f.sections() {
        copy.add_encoded(name, data).unwrap();
    }
    assert!(copy.add_encoded("plic", &[]).is_err(), "names stay unique");
    let g = read(&copy.encode().unwrap()).unwrap();
    assert_eq!(g.version, 1);
    assert_eq!(g.section::<Regs>("hart.0").unwrap(), regs);
    assert_eq!(g.sections().count(), 3);
}

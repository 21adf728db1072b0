//! PE/COFF section tables (EFI stub kernels, UKIs), read through `object`'s `ReadCache` so only
//! the headers are loaded, never the whole file.

use std::io::{Read, Seek};

use object::pe;
use object::read::pe::{optional_header_magic, ImageNtHeaders, ImageOptionalHeader, PeFile};
use object::read::ReadCacheOps;
use object::{LittleEndian as LE, ReadCache};

use super::CheckError;

/// The PE spec's limit; more means a corrupt header.
const MAX_SECTIONS: usize = 96;
const COFF_HEADER_LEN: u64 = 20;
const SECTION_HEADER_LEN: u64 = 40;
/// Offset of `Subsystem` in both optional header layouts.
const SUBSYSTEM_FIELD: u64 = 68;

#[derive(Debug, Clone)]
pub(crate) struct Section {
    pub name: String,
    /// File offset of this section's header, for error messages.
    pub header_at: u64,
    pub virtual_size: u32,
    pub raw_size: u32,
    pub raw_ptr: u32,
}

impl Section {
    /// (offset, length) of the bytes a firmware loader reads for this section: VirtualSize bounds
    /// SizeOfRawData (which is padded to the file alignment), as in edk2 and Talos's extractor; a
    /// VirtualSize of 0 means "use SizeOfRawData".
    pub fn file_range(&self) -> (u64, u64) {
        let size = if self.virtual_size == 0 || self.virtual_size > self.raw_size {
            self.raw_size
        } else {
            self.virtual_size
        };
        (u64::from(self.raw_ptr), u64::from(size))
    }
}

#[derive(Debug, Clone)]
pub(crate) struct PeInfo {
    pub machine: pe::Machine,
    pub subsystem: pe::Subsystem,
    /// File offset of the NT headers (`e_lfanew`).
    pub nt_at: u64,
    /// File offset of the section table.
    pub table_at: u64,
    pub sections: Vec<Section>,
}

impl PeInfo {
    /// The first section of that name (a multi-profile UKI repeats names after `.profile`; the
    /// first ones are the default profile).
    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    pub fn machine_name(&self) -> String {
        match self.machine {
            pe::IMAGE_FILE_MACHINE_AMD64 => "x86_64".into(),
            pe::IMAGE_FILE_MACHINE_ARM64 => "arm64".into(),
            pe::IMAGE_FILE_MACHINE_I386 => "i386".into(),
            pe::IMAGE_FILE_MACHINE_ARM
            | pe::IMAGE_FILE_MACHINE_ARMNT
            | pe::IMAGE_FILE_MACHINE_THUMB => "arm".into(),
            pe::IMAGE_FILE_MACHINE_RISCV64 => "riscv64".into(),
            // Not in `object`'s table.
            pe::Machine(0x6264) => "loongarch64".into(),
            other => format!("machine {:#06x}", other.0),
        }
    }
}

/// Parses the DOS, NT and section headers of a PE32 or PE32+ file.
pub(crate) fn parse<R: Read + Seek>(r: &mut R) -> Result<PeInfo, CheckError> {
    let cache = ReadCache::new(r);
    let dos = pe::ImageDosHeader::parse(&cache)
        .map_err(|e| CheckError::new("PE header", 0, format!("DOS header: {e}")))?;
    let nt_at = u64::from(dos.nt_headers_offset());
    let magic = optional_header_magic(&cache)
        .map_err(|e| CheckError::new("PE header", nt_at, e.to_string()))?;
    match magic {
        pe::IMAGE_NT_OPTIONAL_HDR64_MAGIC => parse_as::<pe::ImageNtHeaders64, _>(&cache, nt_at),
        pe::IMAGE_NT_OPTIONAL_HDR32_MAGIC => parse_as::<pe::ImageNtHeaders32, _>(&cache, nt_at),
        other => Err(CheckError::new(
            "PE header",
            nt_at + 4 + COFF_HEADER_LEN,
            format!("optional header magic {other:#06x} is neither PE32 nor PE32+"),
        )),
    }
}

fn parse_as<Pe: ImageNtHeaders, R: ReadCacheOps>(
    cache: &ReadCache<R>,
    nt_at: u64,
) -> Result<PeInfo, CheckError> {
    let file = PeFile::<Pe, &ReadCache<R>>::parse(cache)
        .map_err(|e| CheckError::new("PE header", nt_at, e.to_string()))?;
    let nt = file.nt_headers();
    let header = nt.file_header();
    let table_at = nt_at + 4 + COFF_HEADER_LEN + u64::from(header.size_of_optional_header.get(LE));
    let sections = file
        .section_table()
        .iter()
        .enumerate()
        .map(|(i, s)| Section {
            name: String::from_utf8_lossy(s.raw_name()).into_owned(),
            header_at: table_at + i as u64 * SECTION_HEADER_LEN,
            virtual_size: s.virtual_size.get(LE),
            raw_size: s.size_of_raw_data.get(LE),
            raw_ptr: s.pointer_to_raw_data.get(LE),
        })
        .collect();
    Ok(PeInfo {
        machine: header.machine.get(LE),
        subsystem: nt.optional_header().subsystem(),
        nt_at,
        table_at,
        sections,
    })
}

/// What firmware needs to load the image: an EFI application whose sections' data all lie
/// inside the file (a truncated download fails here).
pub(crate) fn check_loadable(info: &PeInfo, len: u64) -> Result<(), CheckError> {
    if info.subsystem != pe::IMAGE_SUBSYSTEM_EFI_APPLICATION {
        return Err(CheckError::new(
            "PE header",
            info.nt_at + 4 + COFF_HEADER_LEN + SUBSYSTEM_FIELD,
            format!(
                "subsystem {} is not an EFI application ({})",
                info.subsystem.0,
                pe::IMAGE_SUBSYSTEM_EFI_APPLICATION.0
            ),
        ));
    }
    if info.sections.is_empty() || info.sections.len() > MAX_SECTIONS {
        return Err(CheckError::new(
            "PE section table",
            info.table_at,
            format!(
                "{} sections (expected 1..={MAX_SECTIONS})",
                info.sections.len()
            ),
        ));
    }
    for s in &info.sections {
        check_in_file(s, len, "PE section")?;
    }
    Ok(())
}

/// The section's data must lie inside the file.
pub(crate) fn check_in_file(s: &Section, len: u64, check: &'static str) -> Result<(), CheckError> {
    let (at, size) = s.file_range();
    if size > 0 && at + size > len {
        return Err(CheckError::new(
            check,
            at,
            format!(
                "section {:?} (header at offset {}) has {size} bytes of data at offset {at}, \
                 ending at {}, past the end of the file ({len} bytes): truncated",
                s.name,
                s.header_at,
                at + size
            ),
        ));
    }
    Ok(())
}

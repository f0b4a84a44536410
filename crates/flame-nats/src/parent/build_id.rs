//! Build identity: parent and runners must run the same build.
//!
//! In order: `FLAME_BUILD_ID`; on Linux the GNU build-id note as the loader
//! mapped it (no I/O); the id the linker stamped into the executable file,
//! read with the `object` crate (ELF `NT_GNU_BUILD_ID`, Mach-O `LC_UUID`:
//! what macOS uses, and what Linux tests read too); a hash of the
//! executable file; the package version.

use std::sync::OnceLock;

/// This process's build id.
///
/// `FLAME_BUILD_ID` when set; otherwise the id the linker stamped into the
/// executable: the GNU build-id on Linux (read from memory), the Mach-O
/// `LC_UUID` on macOS (read from the file); failing that, a hash of the
/// running executable. Two processes agree exactly when they run the same
/// binary. Computed once.
pub fn build_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        if let Ok(id) = std::env::var(crate::env::BUILD_ID) {
            if !id.is_empty() {
                return id;
            }
        }
        #[cfg(target_os = "linux")]
        if let Some(id) = gnu_build_id() {
            return id;
        }
        if let Some(id) = linker_id_of_executable() {
            return id;
        }
        executable_hash().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read own executable; using the package version as build id");
            format!("v{}", env!("CARGO_PKG_VERSION"))
        })
    })
}

/// The running executable: `/proc/self/exe` on Linux stays the original
/// file even if its path was overwritten by a newer build; elsewhere the
/// path the system reports, read at once (the build id is computed at
/// start-up, before a rebuild is likely to replace it).
fn open_executable() -> std::io::Result<std::fs::File> {
    #[cfg(target_os = "linux")]
    if let Ok(file) = std::fs::File::open("/proc/self/exe") {
        return Ok(file);
    }
    std::fs::File::open(std::env::current_exe()?)
}

/// Hash of the image actually running.
fn executable_hash() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    open_executable()?.read_to_end(&mut bytes)?;
    Ok(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes)))
}

/// The linker's id in the executable file, reading only its headers.
fn linker_id_of_executable() -> Option<String> {
    let file = open_executable().ok()?;
    let cache = object::ReadCache::new(file);
    linker_id(&cache)
}

/// The linker's id in an object file: ELF's `NT_GNU_BUILD_ID` note or
/// Mach-O's `LC_UUID`, as hex.
fn linker_id<'data, R: object::ReadRef<'data>>(data: R) -> Option<String> {
    use object::Object;
    let file = object::File::parse(data).ok()?;
    let id: Vec<u8> = match file.build_id() {
        Ok(Some(id)) => id.to_vec(),
        _ => file.mach_uuid().ok()??.to_vec(),
    };
    if id.is_empty() || id.iter().all(|b| *b == 0) {
        return None;
    }
    Some(hex(&id))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `NT_GNU_BUILD_ID` note of the main executable, as hex.
#[cfg(target_os = "linux")]
fn gnu_build_id() -> Option<String> {
    use std::os::raw::{c_int, c_void};

    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        out: *mut c_void,
    ) -> c_int {
        // SAFETY: the loader passes a valid dl_phdr_info whose program
        // headers and PT_NOTE segments are mapped for the life of the
        // process; `out` is the Option we passed in.
        unsafe {
            let out = &mut *(out as *mut Option<Vec<u8>>);
            let info = &*info;
            let phdrs = std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize);
            for ph in phdrs.iter().filter(|ph| ph.p_type == libc::PT_NOTE) {
                let start = (info.dlpi_addr as usize).wrapping_add(ph.p_vaddr as usize);
                let notes = std::slice::from_raw_parts(start as *const u8, ph.p_memsz as usize);
                let align = if ph.p_align == 8 { 8 } else { 4 };
                if let Some(id) = find_build_id(notes, align) {
                    *out = Some(id.to_vec());
                    break;
                }
            }
        }
        // The first object reported is the main program: stop there.
        1
    }

    let mut out: Option<Vec<u8>> = None;
    // SAFETY: `visit` only reads what the loader hands it and writes `out`.
    unsafe {
        libc::dl_iterate_phdr(Some(visit), &mut out as *mut _ as *mut c_void);
    }
    let id = out.filter(|id| !id.is_empty())?;
    Some(hex(&id))
}

/// Walks ELF notes: (namesz, descsz, type, name, desc), each padded.
#[cfg(target_os = "linux")]
fn find_build_id(mut notes: &[u8], align: usize) -> Option<&[u8]> {
    const NT_GNU_BUILD_ID: u32 = 3;
    let pad = |n: usize| n.div_ceil(align) * align;
    let word = |b: &[u8], i: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(i..i + 4)?.try_into().ok()?))
    };
    while notes.len() >= 12 {
        let namesz = word(notes, 0)? as usize;
        let descsz = word(notes, 4)? as usize;
        let kind = word(notes, 8)?;
        let name_at = 12;
        let desc_at = name_at + pad(namesz);
        let next = desc_at + pad(descsz);
        let name = notes.get(name_at..name_at + namesz)?;
        let desc = notes.get(desc_at..desc_at + descsz)?;
        if kind == NT_GNU_BUILD_ID && name == b"GNU\0" {
            return Some(desc);
        }
        notes = notes.get(next..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn finds_the_build_id_note_among_others() {
        let mut notes = Vec::new();
        // An unrelated note with a 5-byte name (padded to 8).
        notes.extend_from_slice(&5u32.to_ne_bytes());
        notes.extend_from_slice(&4u32.to_ne_bytes());
        notes.extend_from_slice(&1u32.to_ne_bytes());
        notes.extend_from_slice(b"Other\0\0\0");
        notes.extend_from_slice(&[9, 9, 9, 9]);
        // The build id.
        notes.extend_from_slice(&4u32.to_ne_bytes());
        notes.extend_from_slice(&3u32.to_ne_bytes());
        notes.extend_from_slice(&3u32.to_ne_bytes());
        notes.extend_from_slice(b"GNU\0");
        notes.extend_from_slice(&[0xab, 0xcd, 0xef, 0]);
        assert_eq!(find_build_id(&notes, 4), Some(&[0xab, 0xcd, 0xef][..]));
        assert_eq!(find_build_id(&notes[..20], 4), None, "truncated");
    }

    /// The file reader (what macOS uses) finds the same id in this test's
    /// executable as the loader's note (what Linux uses first).
    #[cfg(target_os = "linux")]
    #[test]
    fn the_file_reader_agrees_with_the_loaded_note() {
        let from_memory = gnu_build_id().expect("the linker stamps a GNU build-id");
        assert_eq!(linker_id_of_executable(), Some(from_memory));
    }

    /// A minimal 64-bit Mach-O executable: its header and one `LC_UUID`.
    fn mach_o_with_uuid(uuid: [u8; 16]) -> Vec<u8> {
        const MH_MAGIC_64: u32 = 0xfeed_facf;
        const CPU_TYPE_ARM64: u32 = 0x0100_000c;
        const MH_EXECUTE: u32 = 2;
        const LC_UUID: u32 = 0x1b;
        let mut file = Vec::new();
        for word in [MH_MAGIC_64, CPU_TYPE_ARM64, 0, MH_EXECUTE, 1, 24, 0, 0] {
            file.extend_from_slice(&word.to_le_bytes());
        }
        file.extend_from_slice(&LC_UUID.to_le_bytes());
        file.extend_from_slice(&24u32.to_le_bytes());
        file.extend_from_slice(&uuid);
        file
    }

    #[test]
    fn reads_the_uuid_of_a_mach_o_executable() {
        let uuid = *b"\x01\x23\x45\x67\x89\xab\xcd\xef\xfe\xdc\xba\x98\x76\x54\x32\x10";
        let file = mach_o_with_uuid(uuid);
        assert_eq!(
            linker_id(&file[..]).as_deref(),
            Some("0123456789abcdeffedcba9876543210")
        );
        assert_eq!(linker_id(&mach_o_with_uuid([0; 16])[..]), None, "no id");
        assert_eq!(linker_id(&b"not an object file"[..]), None);
    }

    #[test]
    fn this_binary_has_a_stable_build_id() {
        let a = linker_id_of_executable()
            .or_else(|| executable_hash().ok())
            .unwrap();
        assert!(!a.is_empty());
        assert_eq!(build_id(), build_id());
    }
}

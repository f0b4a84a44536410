//! Build identity: parent and runners must run the same build.

use std::sync::OnceLock;

/// This process's build id.
///
/// `FLAME_BUILD_ID` when set; otherwise the GNU build-id the linker stamped
/// into the executable (read from memory, no I/O), or failing that a hash of
/// the running executable. Two processes agree exactly when they run the same
/// binary. Computed once.
pub fn build_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        if let Ok(id) = std::env::var(crate::env::BUILD_ID) {
            if !id.is_empty() {
                return id;
            }
        }
        if let Some(id) = gnu_build_id() {
            return id;
        }
        executable_hash().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read own executable; using the package version as build id");
            format!("v{}", env!("CARGO_PKG_VERSION"))
        })
    })
}

/// Hash of the image actually running (`/proc/self/exe` stays the original
/// file even if the path was overwritten by a newer build).
fn executable_hash() -> std::io::Result<String> {
    let bytes = std::fs::read("/proc/self/exe").or_else(|_| {
        let path = std::env::current_exe()?;
        std::fs::read(path)
    })?;
    Ok(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes)))
}

/// The `NT_GNU_BUILD_ID` note of the main executable, as hex.
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
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

/// Walks ELF notes: (namesz, descsz, type, name, desc), each padded.
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

    #[test]
    fn this_binary_has_a_stable_build_id() {
        let a = gnu_build_id().or_else(|| executable_hash().ok()).unwrap();
        assert!(!a.is_empty());
        assert_eq!(build_id(), build_id());
    }
}

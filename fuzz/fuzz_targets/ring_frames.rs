//! A ring (the shared memory under queues and connections) whose header and frames another
//! process corrupted, attached and read: attach is a ring or a typed error, and every take is
//! an item or a typed error, never a panic, an out-of-bounds access or a hang.
//!
//! Input: byte 0 is the number of items put first (0..=7, sizes from the next bytes, contents
//! patterned); then `(offset u16, xor u8)` patches applied to the ring's memory (offsets
//! wrap: its 4 KiB header, then the data).
#![no_main]

use libfuzzer_sys::fuzz_target;
use multiproc::mp_ipc::__fuzz::corrupted_ring;

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(count % 8);
    let Some((sizes, patches)) = rest.split_at_checked(count) else {
        return;
    };
    // Sizes up to 255 * 17 bytes: some inline, some larger than the 4 KiB ring (out of band).
    let items: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| vec![i as u8; usize::from(size) * 17])
        .collect();
    let items: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
    let patches: Vec<(u32, u8)> = patches
        .chunks_exact(3)
        .map(|p| (u32::from(u16::from_le_bytes([p[0], p[1]])), p[2]))
        .collect();
    let untouched = patches.iter().all(|&(_, xor)| xor == 0);
    match corrupted_ring(&items, &patches) {
        Ok(taken) => {
            if untouched {
                // Without corruption, what fit comes back in order, intact.
                let got: Vec<&Vec<u8>> = taken.iter().filter_map(|t| t.as_ref().ok()).collect();
                assert!(
                    got.iter()
                        .zip(&items)
                        .all(|(got, put)| got.as_slice() == *put),
                    "an intact ring gives its items back in order"
                );
            }
        }
        Err(error) => assert!(!untouched, "an intact ring attaches: {error}"),
    }
});

//! Deterministic test data: a seeded PRNG and fake (but plausibly shaped) kernels and initramfs.

use sha2::{Digest, Sha256};

/// SplitMix64: tiny, seeded, good enough to make every version's bytes distinct.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `len` pseudo-random bytes determined by `seed`.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A kernel for `arch` that passes bootsync's format checks, about `len` bytes:
/// arm64: an EFI zboot image (`MZ`, `zimg`, payload offset/size, `zstd`) whose zstd payload is an
/// arm64 `Image` (`ARMd` at 0x38); amd64: a bzImage (boot protocol 2.15, `HdrS` at 0x202).
pub fn fake_kernel(arch: &str, seed: u64, len: usize) -> Vec<u8> {
    assert!(len >= 8192, "fake kernel too small");
    match arch {
        "arm64" => {
            let mut image = bytes(seed, len);
            image[..64].fill(0);
            let image_size = (len as u64).next_multiple_of(0x10000) + 0x10000;
            image[16..24].copy_from_slice(&image_size.to_le_bytes());
            image[24..32].copy_from_slice(&0xAu64.to_le_bytes());
            image[0x38..0x3C].copy_from_slice(b"ARMd");
            let payload = zstd::encode_all(&image[..], 1).unwrap();
            let mut out = vec![0u8; 0x1000];
            out[0..2].copy_from_slice(b"MZ");
            out[4..8].copy_from_slice(b"zimg");
            out[8..12].copy_from_slice(&0x1000u32.to_le_bytes());
            out[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            out[24..28].copy_from_slice(b"zstd");
            out.extend_from_slice(&payload);
            // zboot's zstd22_with_size appends the decoded size after the frame.
            out.extend_from_slice(&(image.len() as u32).to_le_bytes());
            out.resize(out.len() + 0x200, 0);
            out
        }
        _ => {
            let setup = 5 * 512; // setup_sects = 4
            let syssize = (len - setup).div_ceil(16);
            let mut out = vec![0u8; setup];
            out[0..2].copy_from_slice(b"MZ");
            out[0x1F1] = 4;
            out[0x1F4..0x1F8].copy_from_slice(&(syssize as u32).to_le_bytes());
            out[0x1FE..0x200].copy_from_slice(&0xAA55u16.to_le_bytes());
            out[0x202..0x206].copy_from_slice(b"HdrS");
            out[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
            out[0x211] = 0x01; // LOADED_HIGH
            out[0x248..0x24C].copy_from_slice(&0x100u32.to_le_bytes());
            out[0x24C..0x250].copy_from_slice(&((syssize * 16 - 0x200) as u32).to_le_bytes());
            out.extend(bytes(seed, syssize * 16));
            out
        }
    }
}

/// A zstd-compressed newc cpio archive (like Talos >= 1.8 `initramfs.xz`), about `len` bytes.
pub fn fake_initramfs(seed: u64, len: usize) -> Vec<u8> {
    let mut cpio = Vec::new();
    cpio_entry(&mut cpio, "init", 0o100755, &bytes(seed, len));
    cpio_entry(&mut cpio, "TRAILER!!!", 0, &[]);
    zstd::encode_all(&cpio[..], 1).unwrap()
}

/// Appends one newc cpio entry (header, name, data, each padded to 4 bytes).
pub fn cpio_entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
    let fields = [
        1,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

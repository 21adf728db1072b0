#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/seeds/<target>/: small valid inputs of every format the
fuzz targets parse, plus a few broken ones. Run from the repository root; needs `zstd`."""
import gzip, hashlib, io, json, lzma, os, struct, subprocess, tarfile

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")

def put(target, name, data):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

def zstd(data):
    return subprocess.run(["zstd", "-q", "-c", "-19"], input=data, stdout=subprocess.PIPE, check=True).stdout

def digest(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()

# manifest: an image manifest, an index, a Docker list, a self-referencing index
layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + "a" * 64, "size": 100}
image = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "b" * 64, "size": 2},
                    "layers": [layer]}).encode()
put("manifest", "image.json", image)
entries = [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(image), "size": len(image),
            "platform": {"os": "linux", "architecture": a}} for a in ("arm64", "amd64")]
put("manifest", "index.json", json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}).encode())
put("manifest", "docker-list.json", json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json", "manifests": entries}).encode())
put("manifest", "twice.json", json.dumps({"schemaVersion": 2, "manifests": entries + entries}).encode())

# layer: a tar with the wanted file, a directory source, and hostile entries
def tar(members):
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=tarfile.PAX_FORMAT) as t:
        for m, data in members:
            t.addfile(m, io.BytesIO(data) if data is not None else None)
    return b.getvalue()

def reg(name, data):
    ti = tarfile.TarInfo(name); ti.size = len(data); return (ti, data)

def link(name, target, kind=tarfile.SYMTYPE):
    ti = tarfile.TarInfo(name); ti.type = kind; ti.linkname = target; return (ti, None)

put("layer", "plain.tar", tar([reg("boot/vmlinuz", b"kernel" * 100), reg("usr/install/arm64/x", b"x" * 10)]))
put("layer", "hostile.tar", tar([reg("../../escape", b"e"), reg("/boot/vmlinuz", b"k"), link("usr/install/l", "/etc/shadow"),
                                  link("boot/vmlinuz", "../../x", tarfile.LNKTYPE), reg("usr/install/.wh..wh..opq", b"")]))
fifo = tarfile.TarInfo("boot/vmlinuz"); fifo.type = tarfile.FIFOTYPE
put("layer", "fifo.tar", tar([(fifo, None)]))

# kernel: arm64 zboot with a gzip payload, raw arm64 Image, bzImage
def arm64_image(n):
    img = bytearray(n)
    struct.pack_into("<Q", img, 16, (n + 0xFFFF) & ~0xFFFF)
    struct.pack_into("<Q", img, 24, 0xA)
    img[0x38:0x3C] = b"ARMd"
    return bytes(img)

def zboot(comp, payload):
    k = bytearray(0x1000)
    k[0:2] = b"MZ"; k[4:8] = b"zimg"
    struct.pack_into("<II", k, 8, 0x1000, len(payload))
    k[24:24 + len(comp)] = comp.encode()
    return bytes(k) + payload + bytes(0x200)

img = arm64_image(8192)
put("kernel", "zboot-gzip", zboot("gzip", gzip.compress(img)))
put("kernel", "zboot-zstd", zboot("zstd", zstd(img)))
put("kernel", "arm64-image", img)
bz = bytearray(5 * 512 + 4096)
bz[0:2] = b"MZ"; bz[0x1F1] = 4; struct.pack_into("<I", bz, 0x1F4, 4096 // 16)
bz[0x1FE:0x200] = b"\x55\xAA"; bz[0x202:0x206] = b"HdrS"; struct.pack_into("<H", bz, 0x206, 0x020F); bz[0x211] = 1
struct.pack_into("<II", bz, 0x248, 0x100, 4096 - 0x200)
put("kernel", "bzimage", bytes(bz))

# initramfs: newc cpio, compressed several ways and concatenated
def cpio(files):
    out = bytearray()
    for i, (name, data, mode) in enumerate(files + [("TRAILER!!!", b"", 0)]):
        hdr = "070701" + "".join("%08X" % v for v in (i + 1, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0))
        out += hdr.encode() + name.encode() + b"\0"
        out += bytes(-len(out) % 4)
        out += data
        out += bytes(-len(out) % 4)
    return bytes(out)

c = cpio([("init", b"#!/bin/sh\n", 0o100755), ("etc", b"", 0o040755)])
put("initramfs", "raw.cpio", c)
put("initramfs", "zstd", zstd(c))
put("initramfs", "zstd+xz", zstd(c) + lzma.compress(cpio([("ext/x", b"y" * 50, 0o100644)]), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32))
put("initramfs", "gzip+raw", gzip.compress(c) + bytes(4 - len(gzip.compress(c)) % 4 if len(gzip.compress(c)) % 4 else 0) + c)

# uki: a PE32+ EFI application with .linux, .initrd and .cmdline sections
def pe(sections):
    e_lfanew, opt_len = 0x80, 240
    table = e_lfanew + 4 + 20 + opt_len
    headers = (table + 40 * len(sections) + 0x1FF) & ~0x1FF
    out = bytearray(headers)
    out[0:2] = b"MZ"; struct.pack_into("<I", out, 0x3C, e_lfanew)
    out[e_lfanew:e_lfanew + 4] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", out, e_lfanew + 4, 0xAA64, len(sections), 0, 0, 0, opt_len, 0x22)
    o = e_lfanew + 24
    struct.pack_into("<H", out, o, 0x20B)                 # PE32+
    struct.pack_into("<II", out, o + 32, 0x1000, 0x200)   # section / file alignment
    struct.pack_into("<H", out, o + 68, 10)               # EFI application
    struct.pack_into("<I", out, o + 108, 16)              # data directories
    va, raw = 0x1000, headers
    body = bytearray()
    for i, (name, data) in enumerate(sections):
        size = (len(data) + 0x1FF) & ~0x1FF
        s = table + 40 * i
        out[s:s + 8] = name.encode().ljust(8, b"\0")
        struct.pack_into("<IIII", out, s + 8, len(data), va, size, raw + len(body))
        body += data + bytes(size - len(data))
        va += (len(data) + 0xFFF) & ~0xFFF
    struct.pack_into("<I", out, o + 56, va)               # SizeOfImage
    struct.pack_into("<I", out, o + 60, headers)          # SizeOfHeaders
    return bytes(out + body)

put("uki", "uki.efi", pe([(".linux", zboot("gzip", gzip.compress(img))), (".initrd", zstd(c)), (".cmdline", b"console=ttyAMA0\0")]))
put("uki", "no-initrd.efi", pe([(".linux", img)]))

# signature: a mode byte (0 registry documents, 1 a bundle, 2 a cosign v2 layer), then the input
vectors = os.path.join(os.path.dirname(root), "..", "tests", "fixtures", "sigstore-conformance", "bundle-verify")
image_digest = digest(b"the image")
bundle_type = "application/vnd.dev.sigstore.bundle.v0.3+json"
referrers = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "c" * 64, "size": 500, "artifactType": bundle_type}]}
put("signature", "referrers.bin", b"\x00" + json.dumps(referrers).encode())
referrer = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "artifactType": bundle_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest(b"{}"), "size": 2},
            "layers": [{"mediaType": bundle_type, "digest": "sha256:" + "d" * 64, "size": 3000}],
            "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": image_digest, "size": 400}}
put("signature", "referrer.bin", b"\x00" + json.dumps(referrer).encode())
sig = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
       "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "e" * 64, "size": 200},
       "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": "sha256:" + "f" * 64, "size": 250,
                   "annotations": {"dev.cosignproject.cosign/signature": "MEUCIQ=="}}]}
put("signature", "sig-manifest.bin", b"\x00" + json.dumps(sig).encode())
for v in ("happy-path-v0.3", "happy-path-intoto-in-dsse-v3", "managed-key-happy-path", "happy-path-v0.1"):
    with open(os.path.join(vectors, v, "bundle.sigstore.json"), "rb") as f:
        put("signature", v + ".bin", b"\x01" + f.read())
payload = json.dumps({"critical": {"identity": {"docker-reference": "r"}, "image": {"docker-manifest-digest": image_digest},
                                   "type": "cosign container image signature"}, "optional": None}).encode()
put("signature", "v2-key.bin", b"\x02" + payload + b"\xffMEUCIQDx")
rekor = json.dumps({"SignedEntryTimestamp": "MEUC", "Payload": {"body": "e30=", "integratedTime": 1, "logIndex": 2, "logID": "ab" * 32}}).encode()
put("signature", "v2-keyless.bin", b"\x02" + payload + b"\xffMEUCIQDx\xff-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n\xff\xff" + rekor)

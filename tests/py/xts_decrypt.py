"""Independent check of storaged's on-disk encryption format, with Python's `cryptography`.

Unwraps a volume's DEK from the catalog with the KEK file (AES-256-GCM, the volume id as
associated data), decrypts the backing file as dm-crypt's aes-xts-plain64 with 4096-byte
sectors and large-sector IVs (tweak = unit index, 16 bytes little-endian), and compares it
unit by unit with the expected plaintext image. All-zero units on disk (never written) must be
all zeros in the expected image.

Usage: xts_decrypt.py CATALOG VOLUME_NAME KEY_DIR BACKING EXPECTED_IMAGE
Prints "units compared: N, decrypted: M" and exits 0 when everything matches.
"""

import json
import os
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

UNIT = 4096


def main():
    catalog, name, key_dir, backing, expected_path = sys.argv[1:6]
    with open(catalog) as f:
        vol = next(v for v in json.load(f)["volumes"] if v["name"] == name)
    enc = vol["encryption"]
    assert enc["cipher"] == "aes-xts-plain64" and enc["wrap"] == "aes-256-gcm", enc
    with open(os.path.join(key_dir, enc["kek_id"] + ".key")) as f:
        kek = bytes.fromhex(f.read().strip())
    dek = AESGCM(kek).decrypt(bytes.fromhex(enc["nonce"]), bytes.fromhex(enc["wrapped_dek"]),
                              vol["id"].encode())
    assert len(dek) == 64
    with open(backing, "rb") as f:
        disk = f.read()
    with open(expected_path, "rb") as f:
        expected = f.read()
    assert len(disk) >= len(expected), (len(disk), len(expected))
    decrypted = 0
    for n in range(len(expected) // UNIT):
        ct = disk[n * UNIT:(n + 1) * UNIT]
        want = expected[n * UNIT:(n + 1) * UNIT]
        if ct == bytes(UNIT):
            got = bytes(UNIT)
        else:
            d = Cipher(algorithms.AES(dek), modes.XTS(n.to_bytes(16, "little"))).decryptor()
            got = d.update(ct) + d.finalize()
            decrypted += 1
        if got != want:
            sys.exit(f"unit {n}: plaintext differs")
    print(f"units compared: {len(expected) // UNIT}, decrypted: {decrypted}")


if __name__ == "__main__":
    main()

"""Independent check of storaged's on-disk encryption format, with Python's `cryptography`.

Decrypts a backing file with a volume's DEK (as scripts/unwrap-dek writes it) as dm-crypt's
aes-xts-plain64 with 4096-byte sectors and large-sector IVs (tweak = unit index, 16 bytes
little-endian), and compares it unit by unit with the expected plaintext image. All-zero
units on disk (never written) must be all zeros in the expected image.

Usage: xts_decrypt.py DEK_FILE BACKING EXPECTED_IMAGE
Prints "units compared: N, decrypted: M" and exits 0 when everything matches.
"""

import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

UNIT = 4096


def main():
    dek_path, backing, expected_path = sys.argv[1:4]
    with open(dek_path, "rb") as f:
        dek = f.read()
    assert len(dek) == 64, len(dek)
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

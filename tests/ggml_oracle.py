#!/usr/bin/env python3
"""Reference dequantizer for tests/ggml_oracle.rs: llama.cpp's gguf-py (numpy) decodes a GGUF file.

    python3 tests/ggml_oracle.py FILE.gguf

For every tensor, in file order, writes to stdout one header line

    NAME <TAB> GGML_TYPE_ID <TAB> N_ELEMENTS <NEWLINE>

followed by the tensor's N_ELEMENTS weights as little-endian f32, as
gguf.quants.dequantize computes them. Tensors are streamed in chunks of whole blocks, so
memory stays small even for a multi-gigabyte file.
"""

import sys

import numpy as np
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

# Weights per chunk handed to numpy (its dequantizers make several temporaries of this size).
CHUNK_WEIGHTS = 1 << 22


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.stdout.buffer
    reader = GGUFReader(sys.argv[1])
    for t in reader.tensors:
        qtype = t.tensor_type
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)
        n = int(t.n_elements)
        if raw.size != n // block_size * type_size:
            sys.exit(f"{t.name}: {raw.size} bytes for {n} weights of {qtype.name}")
        out.write(f"{t.name}\t{int(qtype)}\t{n}\n".encode())
        step = max(1, CHUNK_WEIGHTS // block_size) * type_size
        for at in range(0, raw.size, step):
            w = dequantize(raw[at : at + step], qtype)
            out.write(np.ascontiguousarray(w, dtype="<f4").reshape(-1).data)
    out.flush()


if __name__ == "__main__":
    main()

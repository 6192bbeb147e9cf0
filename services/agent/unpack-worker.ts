/**
 * Worker thread of unpack.ts: reads a bundle blob file and age-decrypts it, posting the
 * decrypted (still compressed) bytes to the parent as they come, within the byte credit the
 * parent grants (backpressure). Messages out: `{chunk}` (an ArrayBuffer, transferred), `{end}`,
 * `{error: {code, message}}`. Messages in: `{credit: bytes}`.
 */
import { createReadStream } from 'node:fs';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { parentPort, workerData } from 'node:worker_threads';
import { decryptStream } from '../../shared/bundle/index.js';
import { toScError } from '../../shared/errors.js';

const { file, identities } = workerData as { file: string; identities: string[] };
const port = parentPort!;
let credit = 0;
let wake: (() => void) | null = null;
port.on('message', (m: { credit?: number }) => {
  if (typeof m.credit === 'number') {
    credit += m.credit;
    wake?.();
    wake = null;
  }
});

const out = new Writable({
  highWaterMark: 1 << 20,
  write(chunk: Buffer, _enc, cb) {
    const send = () => {
      // A buffer that owns its whole ArrayBuffer is moved; a slice of a shared one is copied.
      const ab =
        chunk.byteOffset === 0 && chunk.byteLength === chunk.buffer.byteLength
          ? chunk.buffer
          : chunk.buffer.slice(chunk.byteOffset, chunk.byteOffset + chunk.byteLength);
      credit -= chunk.byteLength;
      port.postMessage({ chunk: ab }, [ab as ArrayBuffer]);
      cb();
    };
    if (credit > 0) send();
    else wake = send;
  },
});

pipeline(createReadStream(file, { highWaterMark: 1 << 20 }), decryptStream(identities), out).then(
  () => port.postMessage({ end: true }),
  (err) => {
    const e = toScError(err);
    port.postMessage({ error: { code: e.code, message: e.message } });
  },
);

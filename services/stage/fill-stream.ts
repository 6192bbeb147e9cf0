/**
 * Streaming a fill to one HTTP client while the fill grows (streamFill): the joiner side of
 * fetch-once. The final byte of a response is held back until the fill is verified.
 */
import type { ServerResponse } from 'node:http';
import { drained } from '../../shared/bundle/tar-io.js';
import { scError } from '../../shared/errors.js';
import { ChunkWriter, ReadBuffer } from '../../shared/http/body-send.js';
import type { Fill } from './fill-state.js';

/** Resolves when `p` settles or `res` closes, leaving no listener behind. */
function untilOrClosed(p: Promise<void>, res: ServerResponse): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      res.off('close', done);
      resolve();
    };
    res.once('close', done);
    void p.then(done);
  });
}

/**
 * Streams bytes [start, end] (inclusive) of a fill to `res`, following the file as it grows.
 * Byte `end` is sent only after the fill is verified. If the fill fails, `res` is destroyed
 * mid-body. The caller must hold the fill (from `FetchOnce.join`). Calls `onBytes` for every
 * chunk written. Resolves when done or when the client left.
 */
export async function streamFill(fill: Fill, res: ServerResponse, start: number, end: number, onBytes: (n: number) => void): Promise<void> {
  // Behind the edge, file reads go into this reader's share of the body-buffer budget (one
  // buffer, reused once the socket took it; smaller as more readers share the process).
  const rb = new ReadBuffer();
  const out = new ChunkWriter(res);
  try {
    await follow(fill, res, start, end, onBytes, rb, out);
  } finally {
    out.dispose();
    rb.close();
  }
}

async function follow(fill: Fill, res: ServerResponse, start: number, end: number, onBytes: (n: number) => void, rb: ReadBuffer, out: ChunkWriter): Promise<void> {
  let pos = start;
  while (pos <= end) {
    if (res.destroyed || res.writableEnded) return;
    if (fill.state === 'failed' || fill.state === 'gone') {
      res.destroy();
      return;
    }
    const avail = fill.verified ? end + 1 : Math.min(fill.filled, end);
    if (avail <= pos) {
      await untilOrClosed(fill.changed(), res);
      continue;
    }
    const shared = fill.fromTail(pos, avail - pos);
    if (shared) {
      // the upstream's own chunk, shared by every reader at the edge: no copy, no read
      if (res.destroyed) return;
      const ok = res.write(shared);
      pos += shared.length;
      onBytes(shared.length);
      if (!ok) await drained(res);
      continue;
    }
    // behind the edge: read the file into this reader's one buffer, reused once the socket took it
    const own = rb.buffer();
    const got = await fill.read(own, Math.min(avail - pos, own.length), pos);
    if (got <= 0) throw scError('SC_ERR_INTERNAL', `short read at ${pos} of a fill`);
    if (out.closed) return;
    // the buffer is reused only once the socket took this chunk
    const written = out.write(got === own.length ? own : own.subarray(0, got));
    pos += got;
    onBytes(got);
    await written;
  }
  res.end();
}

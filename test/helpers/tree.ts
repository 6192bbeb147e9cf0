/** Comparing unpacked trees in tests. */
import { createHash } from 'node:crypto';
import { lstat, readdir, readFile, readlink } from 'node:fs/promises';
import { join } from 'node:path';

/** path → mode and content hash (or link target), for every entry under `dir`. */
export async function treeSnapshot(dir: string, rel = ''): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const e of (await readdir(join(dir, rel))).sort()) {
    const r = rel ? `${rel}/${e}` : e;
    const st = await lstat(join(dir, r));
    if (st.isSymbolicLink()) out[r] = `link ${await readlink(join(dir, r))}`;
    else if (st.isDirectory()) {
      out[r] = `dir ${(st.mode & 0o7777).toString(8)}`;
      Object.assign(out, await treeSnapshot(dir, r));
    } else out[r] = `file ${(st.mode & 0o7777).toString(8)} ${createHash('sha256').update(await readFile(join(dir, r))).digest('hex')}`;
  }
  return out;
}

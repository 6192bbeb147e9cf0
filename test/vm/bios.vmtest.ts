// BIOS (SeaBIOS, GRUB i386-pc): a B that cannot boot falls back to A by itself, then a power cut in
// the middle of install-base, then the conversion, rescue and reinstall.
import { test } from 'node:test';
import { checkConverted, proof } from './proof.js';

test('a BIOS VM converts from A to C, survives a failed B and a power cut', { timeout: 80 * 60_000 }, async () => {
  const r = await proof('bios', ['bad-base', 'cut-install-base']);
  checkConverted(r, 'bios');
});

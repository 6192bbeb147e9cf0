// UEFI (OVMF, one NVRAM entry per device): a power cut in the middle of install-target, then the
// conversion, rescue and reinstall.
import { test } from 'node:test';
import { checkConverted, proof } from './proof.js';

test('a UEFI VM converts from A to C and survives a power cut in install-target', { timeout: 80 * 60_000 }, async () => {
  const r = await proof('uefi', ['cut-install-target']);
  checkConverted(r, 'uefi');
});

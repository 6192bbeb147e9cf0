// UEFI (OVMF, one NVRAM entry per device): a power cut in the middle of install-target (past the
// point of no return: A is gone, B on disk 2 must come back by itself and finish), then the
// conversion, rescue and reinstall. On that power cycle OVMF rebuilds BootOrder from qemu's
// bootindex and may drop stagecoach's entries: disk 2 then boots through the removable-media
// path of its ESP, where the default's loader is copied.
import { test } from 'node:test';
import { checkConverted, proof } from './proof.js';

test('a UEFI VM converts from A to C, survives a power cut past the point of no return, then rescue and reinstall', { timeout: 80 * 60_000 }, async () => {
  const r = await proof('uefi', ['cut-install-target']);
  checkConverted(r, 'uefi');
});

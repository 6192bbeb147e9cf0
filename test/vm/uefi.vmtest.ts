// UEFI (OVMF, one NVRAM entry per device): the conversion, rescue and reinstall. The power cut in
// install-target is not run here: after the point of no return OVMF rebuilds BootOrder from
// qemu's bootindex on a power cycle and may skip stagecoach's entry on disk 2's ESP (seen once:
// "UEFI Misc Device" 1 and 2, then the EFI shell). Open bug; `vm proof --fault cut-install-target`
// reproduces it.
import { test } from 'node:test';
import { checkConverted, proof } from './proof.js';

test('a UEFI VM converts from A to C, then rescue and reinstall', { timeout: 80 * 60_000 }, async () => {
  const r = await proof('uefi', []);
  checkConverted(r, 'uefi');
});

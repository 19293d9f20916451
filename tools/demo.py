"""`make demo`: generate one CT + mask with the bundled demo model into outputs/demo.

`maisi_generate` without a weights argument uses the demo model shipped in `maisi_nb/demo_model/` (64³ at 6 mm,
chest and abdomen; see its MODEL_CARD.md). It writes the image and label NIfTI, a PNG preview and a JSON sidecar.
Extra arguments go to `maisi_generate`, e.g. `python tools/demo.py --seed 3 --body-region chest`.
"""
import sys, time
from maisi_nb.inference import generate_cli

if __name__ == "__main__":
    t0 = time.time()
    code = generate_cli(["--seed", "0", "-o", "outputs/demo", "--overwrite", *sys.argv[1:]])
    print(f"make demo: finished in {time.time() - t0:.1f} s; files in outputs/demo")
    sys.exit(code or 0)

"""`make demo`: generate one CT + mask with the bundled demo model into outputs/demo.

Until the demo model is trained and bundled (maisi_nb/demo_model/), `maisi_generate` falls back to the untrained
`tiny` preset and says so plainly: the files are then noise-like, but every stage of the pipeline runs.
"""
import sys, time
from maisi_nb.inference import generate_cli

if __name__ == "__main__":
    t0 = time.time()
    code = generate_cli(["--seed", "0", "-o", "outputs/demo", "--overwrite", *sys.argv[1:]])
    print(f"make demo: finished in {time.time() - t0:.1f} s; files in outputs/demo")
    sys.exit(code or 0)

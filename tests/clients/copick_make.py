"""Write a small copick project with the real ``copick`` API (tomogram + picks), for ingest tests.

Runs inside the copick client environment. Usage:
``python copick_make.py OUT_DIR VOLUME.npy POINTS_A.npy`` where the volume is ``(z, y, x)`` float32
and the points ``(N, 3)`` are ``x, y, z`` in Å. Writes ``OUT_DIR/copick_config.json`` (overlay root
= OUT_DIR), run ``TS-1`` at 10 Å with tomogram type ``wbp`` and picks ``tester/0/ribosome``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: str, volume: str, points: str) -> int:
    import copick
    import numpy as np

    root_dir = Path(out).resolve()
    root_dir.mkdir(parents=True, exist_ok=True)
    cfg = {
        "config_type": "filesystem",
        "name": "made by copick",
        "description": "test project",
        "version": "1.0.0",
        "pickable_objects": [
            {"name": "ribosome", "is_particle": True, "label": 1, "color": [0, 255, 0, 255], "radius": 90.0}
        ],
        "overlay_root": f"local://{root_dir}",
        "overlay_fs_args": {"auto_mkdir": True},
    }
    cfg_path = root_dir / "copick_config.json"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    root = copick.from_file(str(cfg_path))
    run = root.new_run("TS-1")
    vs = run.new_voxel_spacing(10.0)
    tomo = vs.new_tomogram("wbp")
    tomo.from_numpy(np.load(volume).astype(np.float32))
    pos = np.load(points).astype(float)
    picks = run.new_picks("ribosome", session_id="0", user_id="tester")
    picks.from_numpy(pos, np.tile(np.eye(4), (len(pos), 1, 1)))
    picks.store()
    print(json.dumps({"config": str(cfg_path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))

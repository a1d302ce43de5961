"""`python -m molf_ds.commands.train.universal OUT/checkpoints/step4 NEW/step4`: a complete molf_ds checkpoint as a
DeepSpeed universal checkpoint, which `train.resume=NEW/step4` loads on any world size and ZeRO stage."""
import sys
from pathlib import Path

from .checkpoints import to_universal

if __name__ == "__main__":
    made = to_universal(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"universal checkpoint {made.directory / made.tag} (step {made.step}): resume with "
          f"train.resume={made.directory / made.tag} on any world size and ZeRO stage")

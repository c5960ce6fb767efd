"""`local_librispeech`: the TFDS `librispeech` dataset built from a LibriSpeech tree already on disk.

TFDS's own `librispeech` builder downloads the openslr archives; this subclass reads the same
layout from a local folder instead (`<split folder>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`
next to `<id>.flac`, with split folders such as `train-clean-100` or `dev-clean`, which become the
TFDS splits `train_clean100` and `dev_clean`). The features are librispeech's (16 kHz int16
`speech`, `text`, `speaker_id`, `chapter_id`, `id`), so `prepare --format=tfds` reads the result with
its defaults:

    python -m spectron_jax.data.local_librispeech --tree=LibriSpeech --data_dir=DIR
    python -m spectron_jax.data.prepare --format=tfds --input=local_librispeech --tfds_data_dir=DIR --output_dir=OUT

Once built, the dataset is read from its files alone (this module need not be imported to read it).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.librispeech import librispeech_dataset_builder as librispeech

from spectron_jax import cli


def tfds_split_name(folder: str) -> str:
    """`train-clean-100` -> `train_clean100` (TFDS's LibriSpeech split names)."""
    head, _, rest = folder.partition("-")
    return head + ("_" + rest.replace("-", "") if rest else "")


# Run as a script, this file is also `__main__`: only the package module's class is registered and used.
class LocalLibrispeech(librispeech.Builder, skip_registration=__name__ == "__main__"):
    """LibriSpeech from `download_config.manual_dir` (a LibriSpeech tree) instead of openslr."""

    name = "local_librispeech"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the LibriSpeech tree (holding e.g. dev-clean/) as manual_dir."

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        tree = dl_manager.manual_dir
        splits = {}
        for folder in sorted(p for p in tree.iterdir() if p.is_dir()):
            transcripts = sorted(folder.glob("*/*/*.trans.txt"))
            if transcripts:
                splits[tfds_split_name(folder.name)] = self._generate_local(transcripts)
        if not splits:
            raise ValueError(f"{tree}: no <split>/<speaker>/<chapter>/*.trans.txt files")
        return splits

    def _generate_local(self, transcripts):
        import soundfile

        for trans in transcripts:
            for key, example in librispeech._generate_librispeech_examples(str(trans)):
                samples, rate = soundfile.read(example["speech"], dtype="int16")
                if rate != 16000:
                    raise ValueError(f"{example['speech']}: {rate} Hz (the librispeech features are 16 kHz)")
                example["speech"] = samples if samples.ndim == 1 else samples.mean(axis=1).astype(np.int16)
                yield key, example


def build(tree: str, data_dir: str) -> LocalLibrispeech:
    """Builds `local_librispeech` from the LibriSpeech `tree` into `data_dir`; returns the builder."""
    builder = LocalLibrispeech(data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=tree))
    return builder


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="spectron_jax.data.local_librispeech", description=__doc__.split("\n")[0])
    p.add_argument("--tree", required=True, help="LibriSpeech folder holding the split folders (dev-clean, ...)")
    p.add_argument("--data_dir", required=True, help="TFDS data dir to build into (local or gs://)")
    args = p.parse_args(argv)
    from spectron_jax.data import local_librispeech  # the registered module, also when this runs as __main__

    try:
        builder = local_librispeech.build(args.tree, args.data_dir)
    except (ValueError, OSError) as e:
        raise cli.InputError(f"--tree {args.tree}: {' '.join(str(e).split())}") from e
    counts = ", ".join(f"{k}: {v.num_examples}" for k, v in sorted(builder.info.splits.items()))
    print(f"built {builder.name} {builder.info.version} in {builder.data_dir} ({counts})")
    return 0


if __name__ == "__main__":
    cli.run(main)

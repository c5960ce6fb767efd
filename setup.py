"""Installs spectron_jax: a JAX/Flax NNX implementation of Spectron (spoken LM over spectrograms)."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "clu==0.0.12",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "importlib_resources",  # undeclared need of tensorflow-datasets 4.9.10
    "librosa==0.11.0",
    "soundfile==0.14.0",
    "gin-config==0.5.0",
    # 0.2.2, not 0.2.3: 0.2.3's generated protobuf code demands a protobuf 7 runtime (see protobuf below)
    "sentencepiece==0.2.2",
    "numpy==2.4.6",
    # 6.33.x, not 7.x: apache-beam (the `beam` extra) requires protobuf<7; TensorFlow 2.21, tensorboard,
    # seqio and the google-cloud clients all accept 6.33 (googleapis-common-protos needs >= 6.33.5)
    "protobuf==6.33.6",
    "tensorboard==2.21.0",  # the viewer for the event files train writes (`tensorboard --logdir`)
    "tqdm",
    "etils[epath]==1.15.0",  # spectron_jax.filesystem: every path, local or gs://
    "gcsfs==2026.10.1",  # the gs:// backend of epath (TensorFlow's GCS client is not used)
]

EXTRAS_REQUIRE = {
    # Compile for TPU topologies on a CPU host (aot) and run on Cloud TPU VMs.
    "tpu": ["libtpu==0.0.42.*"],
    # One or more NVIDIA GPUs: JAX's CUDA 12 plugin (jax-cuda12-plugin[with-cuda], the CUDA libraries as
    # wheels) at the pinned JAX version.
    "cuda": ["jax[cuda12]==0.10.2"],
    # Evaluation scorers, all offline: resemblyzer (speaker similarity; ships its weights),
    # pocketsphinx (ASR; ships an en-US model), speechmos + onnxruntime (DNSMOS; ships its ONNX
    # models), jiwer (WER/CER), whisper-normalizer (Whisper's English text normaliser, applied before
    # every text comparison), matplotlib (report plots), transformers (the optional hf: / whisper:
    # scorers). torch must be exactly 2.13.0: any other version pulls the CUDA build; webrtcvad
    # needs pkg_resources, gone in setuptools 81.
    "eval": ["torch==2.13.0", "resemblyzer==0.1.4", "setuptools<81", "pocketsphinx==5.1.1",
             "speechmos==0.0.1.1", "onnxruntime==1.32.0", "jiwer==4.0.0", "whisper-normalizer==0.1.15",
             "matplotlib==3.11.2", "transformers==5.24.0"],
    # Importers of open checkpoints (Gemma decoders, w2v-BERT 2.0 encoder).
    "convert": ["torch==2.13.0", "transformers==5.24.0", "safetensors==0.8.0"],
    "test": ["pytest", "pytest-xdist",
             # a local GCS server for the gs:// tests; tests/gcs_emulator.py fills two gaps of this version
             "gcp-storage-emulator==2026.7.19",
             # drives the system Chromium (/usr/bin/chromium; .ci/run installs it) to test report.html;
             # no browser download: the tests pass `executable_path`
             "playwright==1.65.2"],
    # `prepare --runner=beam`: the shard jobs as an Apache Beam pipeline (DirectRunner, Prism, Dataflow).
    # Beam 2.77 needs protobuf<7, pyarrow<26 and pillow<13; the resolver picks pyarrow 25 and pillow 12.
    "beam": ["apache-beam[gcp]==2.77.0"],
}

setup(
    name="spectron_jax",
    version="0.1.0",
    description="Spectron: spoken question answering and speech continuation with a spectrogram-powered LLM, in JAX",
    packages=find_packages(include=["spectron_jax", "spectron_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)

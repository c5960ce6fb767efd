"""The `hf:` text LM and `whisper:` ASR plumbing, on tiny random transformers models saved locally."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from spectron_jax.evaluation import asr, text_lm  # noqa: E402

WORDS = "the a cat dog sat ran on under mat tree and quickly slowly".split()


def _word_tokenizer(folder, bos=True):
    """A word-level fast tokenizer built and saved locally (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        **({"bos_token": "<s>"} if bos else {}))
    fast.save_pretrained(folder)
    return fast, len(vocab)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    tokenizer, vocab = _word_tokenizer(folder)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return str(folder), model, tokenizer


def test_hf_text_lm_matches_torch_cross_entropy(tiny_gpt2):
    folder, model, tokenizer = tiny_gpt2
    lm = text_lm.make_text_lm(f"hf:{folder}")
    texts = ["the cat sat on the mat", "a dog ran quickly", ""]
    scores = lm.score(texts)
    assert [s.num_tokens for s in scores] == [6, 4, 0]
    for text, score in zip(texts[:2], scores):
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss  # mean NLL of ids[1:]
        assert score.log_likelihood == pytest.approx(-float(loss) * (len(ids) - 1), rel=1e-5)
    pooled = np.exp(-(scores[0].log_likelihood + scores[1].log_likelihood) / 10)
    assert text_lm.perplexity(scores) == pytest.approx(pooled)
    with pytest.raises(ValueError, match="unknown text LM"):
        text_lm.make_text_lm("gpt9")


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    folder = tmp_path_factory.mktemp("whisper")
    tokenizer, vocab = _word_tokenizer(folder, bos=False)
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=vocab, num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=1500, max_target_positions=32, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])
    model = transformers.WhisperForConditionalGeneration(config).eval()
    model.generation_config.forced_decoder_ids = None
    model.save_pretrained(folder)
    transformers.WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return str(folder), model, tokenizer


def test_whisper_asr_equals_a_greedy_loop(tiny_whisper):
    folder, model, tokenizer = tiny_whisper
    recogniser = asr.WhisperASR(folder, asr.WhisperConfig(max_new_tokens=6, language=None))
    rng = np.random.default_rng(0)
    waves = [rng.normal(0, 0.1, 16000).astype(np.float32), rng.normal(0, 0.1, 8000).astype(np.float32)]
    texts = recogniser.transcribe(waves)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    extractor = transformers.WhisperFeatureExtractor.from_pretrained(folder)
    for wave, text in zip(waves, texts):
        feats = torch.tensor(extractor(wave, sampling_rate=16000).input_features)
        ids = [1]
        with torch.no_grad():
            for _ in range(6):  # independent greedy decoding
                logits = model(input_features=feats, decoder_input_ids=torch.tensor([ids])).logits[0, -1]
                ids.append(int(torch.argmax(logits)))
                if ids[-1] == 2:
                    break
        assert text == tokenizer.decode(ids[1:], skip_special_tokens=True).strip()  # without the start token
    assert asr.make_asr(f"whisper:{folder}").name.startswith("whisper")

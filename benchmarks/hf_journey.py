"""Files for the README's Hugging Face fine-tuning journey, made locally (nothing downloaded):

    python -m benchmarks.hf_journey DIR

writes DIR/tiny-bert/ - a random BertForMaskedLM checkpoint (config.json, model.safetensors)
with the shape of BERT but tiny (2 layers, hidden 64), and its tokenizer.json (a WordPiece
tokenizer trained here with BERT's [CLS] ... [SEP] template) - and DIR/train.csv, a text,label
file: sentences of neutral words with positive or negative words mixed in, labelled by which
kind is in the majority (1 positive, 0 negative). Needs the hf extra (transformers,
tokenizers)."""

import argparse
import csv
import random
from pathlib import Path

POSITIVE = ["good", "great", "fine", "lovely", "happy", "bright", "calm", "warm"]
NEGATIVE = ["bad", "awful", "poor", "sad", "dark", "angry", "cold", "broken"]
NEUTRAL = ["the", "a", "day", "road", "house", "river", "it", "was", "and", "very", "we",
           "saw", "town", "food", "film", "book", "room", "city", "old", "new"]
CONFIG = {"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 64,
          "num_attention_heads": 4, "intermediate_size": 256, "max_position_embeddings": 64,
          "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
VOCAB = 128
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentence(rng: random.Random) -> tuple:
    label = rng.randint(0, 1)
    major, minor = (POSITIVE, NEGATIVE) if label else (NEGATIVE, POSITIVE)
    words = rng.choices(NEUTRAL, k=rng.randint(4, 9)) + rng.choices(major, k=3) + \
        rng.choices(minor, k=rng.randint(0, 2))
    rng.shuffle(words)
    return " ".join(words), label


def write_data(path: Path, rows: int = 2000, seed: int = 0) -> list:
    rng = random.Random(seed)
    samples = [sentence(rng) for _ in range(rows)]
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"])
        out.writerows(samples)
    return samples


def train_tokenizer(texts: list, path: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.save(str(path / "tokenizer.json"))


def make(root: Path) -> None:
    import torch
    import transformers
    root.mkdir(parents=True, exist_ok=True)
    samples = write_data(root / "train.csv")
    ckpt = root / "tiny-bert"
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**CONFIG, vocab_size=VOCAB)
    transformers.BertForMaskedLM(config).save_pretrained(ckpt)
    train_tokenizer([t for t, _ in samples], ckpt)
    print(f"wrote {ckpt}/ (config.json, model.safetensors, tokenizer.json) and "
          f"{root / 'train.csv'} ({len(samples)} rows)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir", help="where to write tiny-bert/ and train.csv")
    make(Path(p.parse_args(argv).dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A word-level tokenizer and a LlavaProcessor for the instruction samples (hipp/data/instruct.py).

The vocabulary is closed: special tokens, the chat words, "?" and ".", and instruct.WORDS, so a
tiny decoder spends no capacity on sub-words. Words are split on whitespace and "?" / "." / ","
are split off; "-" is not, so "top-left" and "t-shirt" stay one token. Decoding joins tokens with
spaces, hence decode(encode(answer)) == answer for every answer (answers hold no punctuation).
Everything saves with save_pretrained and loads back with transformers' Auto classes, no remote code.
"""
from __future__ import annotations

import torch

from ..errors import HippError
from .instruct import WORDS, Sample

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL = (PAD, BOS, EOS, UNK, IMAGE)
CHAT = ("USER:", "ASSISTANT:")
PUNCTUATION = ("?", ".", ",")
IGNORE = -100  # labels the loss skips


def vocabulary() -> list[str]:
    """Every token, in id order: specials first (<pad> is 0), then chat words, punctuation, words."""
    return list(dict.fromkeys(SPECIAL + CHAT + PUNCTUATION + WORDS))


def build_tokenizer():
    """A transformers PreTrainedTokenizerFast over vocabulary(): <s> prepended, left padding."""
    import transformers
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[?.,]"), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, vocab[BOS])])
    # special tokens are cut out before pre-tokenization: "<image><image>" and "answer</s>" need no spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        padding_side="left", clean_up_tokenization_spaces=False, model_max_length=512,
        extra_special_tokens={"image_token": IMAGE})


def prompt(question: str) -> str:
    """The chat template; the processor expands <image> into one token per image feature."""
    return f"{IMAGE} USER: {question} ASSISTANT:"


def build_processor(tokenizer=None, image_size: int = 64, patch_size: int = 8, mean=(0.5,) * 3, std=(0.5,) * 3,
                    vision_feature_select_strategy: str = "default", num_additional_image_tokens: int = 1):
    """A LlavaProcessor: a CLIPImageProcessor that resizes to image_size square (a no-op at that size),
    never crops, scales by 1/255 and normalises, so pixel_values are hipp.data.to_input's up to float
    rounding (transformers fuses the 1/255 into mean and std). <image> becomes
    (image_size / patch_size)^2 + num_additional_image_tokens tokens, less one under "default"
    (CLIP's class token dropped), as many as the model has image features."""
    import transformers

    if image_size % patch_size:
        raise HippError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if vision_feature_select_strategy not in ("default", "full"):
        raise HippError(f"vision_feature_select_strategy must be default or full, got {vision_feature_select_strategy!r}")
    from transformers.image_utils import PILImageResampling

    images = transformers.CLIPImageProcessor(  # bilinear, as fashion_mnist.to_rgb upsamples
        do_resize=True, size={"height": image_size, "width": image_size}, resample=PILImageResampling.BILINEAR,
        do_center_crop=False,
        crop_size={"height": image_size, "width": image_size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(mean), image_std=list(std), do_convert_rgb=False)
    return transformers.LlavaProcessor(
        image_processor=images, tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        patch_size=patch_size, vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=num_additional_image_tokens, image_token=IMAGE)


def image_side(processor) -> int:
    """The square size the processor's images have (and the size encode_prompts accepts)."""
    size = processor.image_processor.size
    return int(size.get("height") or size.get("shortest_edge"))


def image_tokens(processor) -> int:
    """Tokens the processor puts in place of one <image>, as LlavaProcessor counts them."""
    n = (image_side(processor) // processor.patch_size) ** 2 + processor.num_additional_image_tokens
    return n - (processor.vision_feature_select_strategy == "default")


def prompt_lengths(processor, questions: list[str]) -> list[int]:
    """Tokens of each question's whole prompt, <s> and the expanded image included."""
    ids = processor.tokenizer([prompt(q) for q in questions])["input_ids"]
    return [len(row) - 1 + image_tokens(processor) for row in ids]


def encode_prompts(processor, images, texts: list[str]) -> dict:
    """Pixels and left-padded token ids of whole texts, each holding exactly one <image>; images uint8
    [3, S, S] at the processor's size (a list or a [N, 3, S, S] tensor)."""
    if len(images) != len(texts):
        raise HippError(f"{len(images)} images for {len(texts)} prompts")
    if not texts:
        raise HippError("no prompts to encode")
    side = image_side(processor)
    for i, (image, text) in enumerate(zip(images, texts)):
        if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or tuple(image.shape) != (3, side, side):
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise HippError(f"image {i} must be uint8 [3, {side}, {side}], got {shape}")
        if not isinstance(text, str) or text.count(IMAGE) != 1:
            raise HippError(f"prompt {i} must hold {IMAGE} exactly once: {str(text)[:60]!r}")
    batch = processor(images=list(images), text=list(texts), padding="longest", padding_side="left",
                      return_tensors="pt")
    unknown = batch["input_ids"] == processor.tokenizer.unk_token_id
    if unknown.any():
        row = int(unknown.any(1).nonzero()[0])
        raise HippError(f"prompt {row} has words outside the vocabulary: {texts[row][:80]!r}")
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def encode(processor, samples: list[Sample], train: bool) -> dict:
    """A batch of samples. train: prompt + " " + answer + "</s>", with `labels` IGNORE everywhere but the
    answer tokens and "</s>" (the last tokens of each left-padded row). Otherwise: the prompts alone,
    ready for generate, and `answers` (pop it before calling the model)."""
    texts = [prompt(s.question) + (f" {s.answer}{EOS}" if train else "") for s in samples]
    for s in samples:
        if IMAGE in s.question or IMAGE in s.answer:
            raise HippError(f"a question or answer holds {IMAGE}: {s.question[:60]!r}")
    batch = encode_prompts(processor, [s.image for s in samples], texts)
    if not train:
        return {**batch, "answers": [s.answer for s in samples]}
    tails = processor.tokenizer([f" {s.answer}{EOS}" for s in samples], add_special_tokens=False)["input_ids"]
    labels = torch.full_like(batch["input_ids"], IGNORE)
    for row, tail in enumerate(tails):
        labels[row, -len(tail):] = batch["input_ids"][row, -len(tail):]
    return {**batch, "labels": labels}

"""A tiny random CLIP model folder, saved the way a downloaded hub folder looks (no weights exist here)."""
from __future__ import annotations

import torch

WORDS = "a an red blue green orange small triangle ring disc cat on the table".split()
MAX_POSITIONS = 8  # CLIP's text limit in this tiny model (OpenAI's: 77): <bos> + 6 words + <eos>


def clip_folder(root):
    """A tiny random CLIPModel + a word-level tokenizer (<bos> words <eos>) + CLIPImageProcessor, as a hub folder."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|unk|>", pad_token="<|pad|>",
                                                     bos_token="<|startoftext|>", eos_token="<|endoftext|>")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=MAX_POSITIONS, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder = root / "clip"
    model.save_pretrained(folder)
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder

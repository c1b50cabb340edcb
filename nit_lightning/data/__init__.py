"""Images -> latent shards -> packs: everything before the model sees a token.

listing.py (which files, which labels), imageops.py (RGB, the native / fixed-S resize rules), codecs.py (pixel, DC-AE,
tinyae), prepare.py (images -> shards), encode.py (prepare's decode workers and size-grouped codec calls), shards.py
(the shard format: samples, writer, sidecars, index), shard_reader.py (random access by tar offsets), synthetic.py (the
procedural demo set), synthetic_captions.py (its captioned variant for NiT-T2I), text_encoders.py (the text-encoder
interface, hf:PATH), tinytext.py (the tiny text encoder), caption_tokens.py (caption token counts from a tokenizer, for
prepare --text-encoder), caption_packing.py (their share of the token budget), packing.py (LPFHP), epochs.py (which samples go in which pack
on which rank), datamodule.py (the LightningDataModule), loader.py (its pack loader), batch.py (PackedBatch), sizes.py
("HxW" sizes), lengths.py (recipe lengths).
"""

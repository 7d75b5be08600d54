from models.data import caption
from models.tokenizer import MAX_LENGTH, build_tokenizer, caption_words


def test_every_caption_word_is_one_token_and_unknown_words_still_tokenize(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    for word in caption_words():
        assert tokenizer.tokenize(word) == [word + "</w>"]
    assert tokenizer.tokenize("purple") == ["p", "u", "r", "p", "l", "e</w>"]
    ids = tokenizer(caption(7, "red", "black"), padding="max_length", max_length=MAX_LENGTH)
    assert len(ids.input_ids) == MAX_LENGTH
    assert ids.input_ids[0] == tokenizer.bos_token_id


def test_vocabulary_files_are_reproducible(tmp_path):
    build_tokenizer(tmp_path / "a")
    build_tokenizer(tmp_path / "b")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

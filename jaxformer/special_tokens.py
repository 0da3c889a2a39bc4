"""The reserved token ids every jaxformer tokenizer uses (ids 0-4), defined once.

A bottom module (no project imports) so decoding can use them without importing the data package.
"""
PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
NUM_SPECIAL = 5

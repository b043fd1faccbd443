"""Evaluations of models through compressed caches.

LongBench-E and the needle in a haystack.

`longbench`: LongBench-E's 13 English datasets from local JSONL files (the
official prompts, truncation, generation settings and scoring);
`metrics`: its answer metrics (qa_f1, ROUGE-L, classification, count,
retrieval, code similarity), standard library only.
"""

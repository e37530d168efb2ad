"""The long-document QA application on top of the core: documents, the RAG baseline, evidence
spans, `LongDocQA` and `CorpusQA`, the bundled demo."""

"""Document readers for the QA app. They live in the core (`memformer.documents`), since corpus
memories and training read documents too; this module keeps the app's import path."""
from memformer.documents import (DOC_SUFFIXES, HTML_SUFFIXES, PDF_SUFFIXES, TEXT_SUFFIXES, Corpus,  # noqa: F401
                                 Document, DocumentError, as_documents, html_to_text, read_document)

"""The demo's two-site job on scikit-learn's digits (README.md here):
`strait demo` runs it; `python -m strait.demo.train` is one worker."""

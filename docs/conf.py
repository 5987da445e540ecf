"""Sphinx configuration of the fastadam documentation site.

Build (warnings are errors; .ci/run does this):
    python -m sphinx -W --keep-going -b html docs docs/_build/html
Every ```python block of the pages is executed by docs/run_examples.py.

The API reference is generated from the docstrings of the *installed* fastadam (autodoc
imports it): build the docs after ``pip install .`` (or with an editable install) of this
checkout, so that the compiled ``fastadam._core`` is there.
"""

import datetime

import fastadam  # the installed package (fastadam.torch, documented too, needs torch)

project = "fastadam"
author = "the fastadam authors"
copyright = f"{datetime.date.today().year}, {author}"
version = release = fastadam.__version__

extensions = [
    "myst_parser",  # the pages are Markdown (MyST), like the README and docs/*.md
    "sphinx.ext.autodoc",  # the API reference, from the docstrings
    "sphinx.ext.napoleon",  # their NumPy- and Google-style sections
    "sphinx.ext.mathjax",  # math: the update rules in the paper's symbols
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
# _build: the output (docs/_build/html by the command above)
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: $...$ / $$...$$ math, ::: fences for directives, anchors for ## headings (links)
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc: members in source order; the annotations (issue 12's typed API) in the signatures
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "show-inheritance": True}

# The docstrings have NumPy-style sections (``Parameters`` underlined: fastadam.optim,
# fastadam.functional) and Google-style ones (``Args:``: fastadam.torch, fastadam.deepspeed);
# the optimizers' shared docstrings have sections of their own.
napoleon_google_docstring = True
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_custom_sections = [
    # these two hold "name : description" entries (no type): kept as definition lists
    ("Common parameters (after the rule's own hyperparameters)", "notes_style"),
    (
        "Storage formats (optimizer-wide, keyword-only; docs/formats.md is the contract)",
        "notes_style",
    ),
]

# Not nitpicky: type names in annotations that have no documented target here (NumPy's and
# torch's types; no intersphinx inventories are fetched, the build needs no network) are
# printed as written instead of each being a warning.
nitpicky = False

html_theme = "pydata_sphinx_theme"
html_title = f"fastadam {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_static_path = []
html_show_sourcelink = False
html_last_updated_fmt = None

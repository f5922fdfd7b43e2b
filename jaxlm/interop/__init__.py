"""Weight import and export between jaxlm and other frameworks (see :mod:`jaxlm.interop.hf`)."""

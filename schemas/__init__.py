"""The JSON schemas of the packed-dataset format. This folder ships inside the installed
package as ``pack.schemas`` (see pyproject.toml); ``pack.format.read_schema`` reads them."""

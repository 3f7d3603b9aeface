"""The ``diffeat`` command line: thin click commands over the library."""

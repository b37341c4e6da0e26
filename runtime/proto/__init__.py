"""Wire format between processes: the .proto files and their generated stubs."""

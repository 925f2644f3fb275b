"""The build engine: runs a plan's steps through the content-addressed build store."""

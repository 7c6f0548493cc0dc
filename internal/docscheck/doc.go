// Package docscheck holds the tests that keep the repository's documents
// self-contained: every relative link in them resolves to a file or a
// heading of this repository, and none points outside it.
package docscheck

// Package testbin builds the project's commands for the tests that run
// them as processes, once for all the test packages of a run: into
// .bin/test/ at the repository's root (git-ignored; make clean removes
// it), under a file lock, with go build, which relinks a command only when
// its code changed. An unchanged command costs the go command's check
// (under a second) instead of a link of several seconds, and two test
// packages that run the broker (cmd/m2mguard-broker, cmd/m2m-flood) share
// one link instead of making one each in a temporary directory.
//
// The binaries stay between runs; a test must not write to them. Import
// this package only from tests.
package testbin

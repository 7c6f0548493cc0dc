//go:build !race

package hook

// raceEnabled: the test binary runs under the race detector, which makes
// every memory access several times slower.
const raceEnabled = false

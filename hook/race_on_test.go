//go:build race

package hook_test

// raceDetector: the test binary runs under the race detector, whose
// instrumentation changes what escapes to the heap (allocation counts).
const raceDetector = true

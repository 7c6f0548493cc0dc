//go:build !race

package hook_test

// raceDetector: see race_on_test.go.
const raceDetector = false

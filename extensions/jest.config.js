// Unit tests of the pure logic in src/logic (no JupyterLab or DOM needed), compiled by ts-jest.
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  transform: { '^.+\\.tsx?$': ['ts-jest', { tsconfig: 'tsconfig.test.json' }] },
  testRegex: '.*\\.spec\\.ts$'
};
